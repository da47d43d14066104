"""The model zoo against Table 1, Table 2 and torchvision (PAPER.md)."""

import pytest
import torch
import torchvision
from torch import nn

from vgg_ray.cli import main
from vgg_ray.errors import ConfigError
from vgg_ray.evaluate import DenseNet
from vgg_ray.models import (
    CONFIGS,
    TORCHVISION_NAMES,
    build_vgg,
    init_from_shallow,
    summarize,
)

# PAPER.md, Table 2: exact parameter counts at 1000 classes.
TABLE_2 = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}
WEIGHT_LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
# PAPER.md: forward multiply-adds at 224, in G.
FORWARD_GMACS = {"A": 7.61, "B": 11.31, "C": 11.77, "D": 15.47, "E": 19.63}


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_counts_and_depth_match_tables_1_and_2(name):
    net = summarize(name)
    assert net.parameters == TABLE_2[name]
    assert net.weight_layers == WEIGHT_LAYERS[name]


@pytest.mark.parametrize("name", FORWARD_GMACS)
def test_forward_cost_matches_the_paper(name):
    assert summarize(name).forward_macs / 1e9 == pytest.approx(FORWARD_GMACS[name], rel=0.01)


def test_a_lrn_has_alexnet_lrn_right_after_conv1_1():
    features = build_vgg("A-LRN", width=1 / 16).features
    assert isinstance(features[0], nn.Conv2d) and isinstance(features[1], nn.ReLU)
    lrn = features[2]
    assert isinstance(lrn, nn.LocalResponseNorm)
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)


def test_c_has_1x1_convs_as_third_conv_of_stages_3_to_5():
    convs = [m for m in build_vgg("C", width=1 / 16).features if isinstance(m, nn.Conv2d)]
    kernels = [m.kernel_size[0] for m in convs]
    # stages: 2, 2, 3, 3, 3 convs; the third of stages 3, 4, 5 (indices 6, 9, 12) is 1x1
    assert kernels == [3, 3, 3, 3, 3, 3, 1, 3, 3, 1, 3, 3, 1]


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_outputs(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, TORCHVISION_NAMES[name])(num_classes=10).eval()
    ours = build_vgg(name, num_classes=10).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images))


def test_d_conv_indices_are_torchvision_s():
    # PAPER.md: conv indices of D in torchvision's Sequential.
    convs = [i for i, m in enumerate(build_vgg("D", width=1 / 16).features)
             if isinstance(m, nn.Conv2d)]  # fmt: skip
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


@pytest.mark.parametrize("size", [32, 57, 224])
def test_width_scales_every_layer_and_any_input_from_32px_works(size):
    model = build_vgg("E", num_classes=7, width=0.25).eval()
    widths = {m.out_channels for m in model.features if isinstance(m, nn.Conv2d)}
    assert widths == {16, 32, 64, 128}
    assert model.classifier[0].out_features == 1024
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


@pytest.mark.parametrize("init", ["paper", "glorot", "kaiming"])
def test_inits_draw_the_documented_weights_and_zero_biases(init):
    torch.manual_seed(0)
    model = build_vgg("A", num_classes=100, width=0.5, init=init)
    fc2 = model.classifier[3]  # 2048 x 2048: enough samples for a tight std estimate
    if init in ("paper", "kaiming"):  # N(0, 0.01): the paper's "variance 10^-2" read as std
        expected_std = 0.01  # (PAPER.md); torchvision's (kaiming) init draws FCs the same way
    else:  # Xavier uniform on [-b, b], b = sqrt(6 / (fan_in + fan_out)); std = b / sqrt(3)
        bound = (6 / (2048 + 2048)) ** 0.5
        assert fc2.weight.abs().max() <= bound
        expected_std = bound / 3**0.5
    assert fc2.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    if init == "kaiming":  # He et al., fan_out: std = sqrt(2 / (out_channels * 3 * 3))
        conv = model.features[-3]  # the last conv, 256 x 256 x 3 x 3 at width 0.5
        assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if hasattr(m, "bias")
               and isinstance(m, nn.Conv2d | nn.Linear))  # fmt: skip


def test_dense_form_equals_the_net_at_224_and_gives_a_score_map_at_384():
    torch.manual_seed(0)
    model = build_vgg("D", num_classes=5, width=1 / 16, init="glorot").eval()
    dense = DenseNet(model, 224).eval()
    with torch.no_grad():
        image = torch.randn(2, 3, 224, 224)
        torch.testing.assert_close(dense(image).flatten(1), model(image), rtol=1e-4, atol=1e-5)
        # 384 / 32 = 12 feature cells; a 7x7 kernel leaves a 6x6 map of class scores
        assert dense(torch.randn(1, 3, 384, 384)).shape == (1, 5, 6, 6)


def test_dense_form_shares_weights_with_the_net():
    model = build_vgg("A", num_classes=3, width=1 / 16)
    dense = DenseNet(model, 224)
    with torch.no_grad():
        model.classifier[6].bias.fill_(7.0)
    assert dense.classifier[6].bias[0].item() == 7.0
    assert {p.data_ptr() for p in dense.parameters()} <= {p.data_ptr() for p in model.parameters()}


def test_dense_form_rejects_inputs_below_224():
    dense = DenseNet(build_vgg("A", num_classes=3, width=1 / 16), 224)
    with pytest.raises(ValueError, match="at least 224"):
        dense(torch.randn(1, 3, 128, 128))


@pytest.mark.parametrize("deep_name", ["B", "C", "D", "E"])
def test_init_from_shallow_copies_exactly_the_seven_layers(deep_name):
    torch.manual_seed(0)
    trained_a = build_vgg("A", num_classes=10, width=1 / 16)
    deep = build_vgg(deep_name, num_classes=10, width=1 / 16)
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    copied = init_from_shallow(deep, trained_a)

    assert len(copied) == 7
    # Stages 1 and 2 start at features.0 and features.5 in B..E (two convs each, plus pools).
    assert copied[:2] == ["features.0", "features.5"]
    assert copied[4:] == ["classifier.0", "classifier.3", "classifier.6"]
    a_layers = ["features.0", "features.3", "features.6", "features.8",
                "classifier.0", "classifier.3", "classifier.6"]  # fmt: skip
    a_state, after = trained_a.state_dict(), deep.state_dict()
    for source, target in zip(a_layers, copied, strict=True):
        for tensor in ("weight", "bias"):
            assert torch.equal(after[f"{target}.{tensor}"], a_state[f"{source}.{tensor}"])
    copied_keys = {f"{name}.{t}" for name in copied for t in ("weight", "bias")}
    for key, value in after.items():
        if key not in copied_keys:
            assert torch.equal(value, before[key]), key


def test_init_from_shallow_refuses_a_different_width_or_class_count():
    deep = build_vgg("D", num_classes=10, width=1 / 16)
    with pytest.raises(ConfigError, match="width or class count"):
        init_from_shallow(deep, build_vgg("A", num_classes=10, width=1 / 8))
    with pytest.raises(ConfigError, match="classifier.6"):
        init_from_shallow(deep, build_vgg("A", num_classes=11, width=1 / 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "F"}, "unknown VGG net 'F'"),
        ({"name": "vgg16"}, "choose one of A, A-LRN, B, C, D, E"),
        ({"name": "A", "num_classes": 0}, "num_classes must be a positive integer"),
        ({"name": "A", "width": 0}, "width must be > 0"),
        ({"name": "A", "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"name": "A", "init": "xavier"}, "unknown init 'xavier'"),
    ],
)
def test_bad_arguments_give_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_vgg(**kwargs)


def test_models_command_prints_the_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "143,667,240" in out and "A-LRN" in out
    assert out.count("\n") == 7  # header and six nets


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_batch_norm_variants_are_torchvisions_vgg_bn(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"{TORCHVISION_NAMES[name]}_bn")(num_classes=10)
    ours = build_vgg(name, num_classes=10, batch_norm=True)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), reference.eval()(images))
    assert ours.batch_norm and not build_vgg(name, width=1 / 16).batch_norm


def test_init_from_shallow_carries_each_copied_convs_batch_norm():
    torch.manual_seed(0)
    trained_a = build_vgg("A", num_classes=10, width=1 / 16, batch_norm=True)
    with torch.no_grad():
        trained_a.features[1].running_mean.fill_(3.0)  # conv1_1's batch norm, "trained"
    deep = build_vgg("D", num_classes=10, width=1 / 16, batch_norm=True)
    copied = init_from_shallow(deep, trained_a)
    assert "features.1" in copied and len(copied) == 11  # 7 layers + 4 batch norms
    assert torch.equal(deep.features[1].running_mean, trained_a.features[1].running_mean)


# The paper's N(0, 0.01) stalls the deep nets (Sect. 3.1; He et al. 2015, Sect. 2.2): E's
# initial logits there have a std of ~3e-7 on pixel-scale input. No profile may start a deep
# net like that. Nets A and A-LRN keep the paper's init, which the paper trained them from: their
# logits (~1e-3) are 3-4 orders of magnitude above E's, and their gradient reaches conv1_1.
@pytest.mark.parametrize("name", CONFIGS)
def test_every_nets_default_init_passes_a_signal_at_full_width(name):
    from vgg_ray.config import paper

    config = paper(name)
    torch.manual_seed(0)
    model = build_vgg(name, init=config.init).eval()
    pixels = torch.rand(2, 3, 112, 112) * 255 - 128  # the paper's input: 0..255 minus the mean
    with torch.no_grad():
        spread = model(pixels).std().item()
    assert spread >= (5e-4 if name in ("A", "A-LRN") else 1e-2), (config.init, spread)
    if name == "E":  # what the deep nets are spared
        with torch.no_grad():
            stalled = build_vgg("E", init="paper").eval()(pixels).std().item()
        assert stalled < 1e-5
