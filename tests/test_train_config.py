"""The training plane without a cluster: config, options, init, the step, the tracker."""

import math
from dataclasses import replace

import pytest
import torch

from vgg_ray import checkpoint as ckpt
from vgg_ray.cli import main
from vgg_ray.config import TrainConfig, demo, paper
from vgg_ray.models import build_vgg
from vgg_ray.steps import topk_correct, train_step
from vgg_ray.train import _initial_weights


def test_paper_profile_is_the_papers_recipe():
    config = paper("E")
    assert (config.lr, config.momentum, config.weight_decay) == (1e-2, 0.9, 5e-4)
    assert (config.global_batch, config.epochs, config.dropout) == (256, 74, 0.5)
    assert (config.lr_factor, config.lr_decays) == (0.1, 3)
    assert config.data.scale == (256, 512) and config.data.crop == 224
    assert paper("A").data.scale == (256, 256)


def test_config_round_trips_through_a_dict():
    config = demo("D", lr=0.02)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.flat()["data.crop"] == 32


def test_micro_batch_keeps_the_global_batch_whatever_the_worker_count():
    for workers, accum in [(1, 1), (2, 1), (4, 2), (8, 4)]:
        config = paper("E", workers=workers, grad_accum=accum)
        assert config.micro_batch * workers * accum == 256


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "F"], "invalid choice: 'F'"),
        (["--lr", "0"], "lr must be > 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--global-batch", "30", "--workers", "4"], "not divisible by workers"),
        (["--scale", "512-256"], "512"),
        (["--scale", "big"], "not a scale or range"),
        (["--manifest", "/nonexistent/manifest.json"], "/nonexistent/manifest.json"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--clip-grad-norm", "-1"], "clip_grad_norm must be >= 0"),
        (["--max-nonfinite-steps", "0"], "max_nonfinite_steps must be >= 1"),
        (["--init", "/no/such/weights.pth"], "init '/no/such/weights.pth'"),
        (["--config", "/no/such.yaml"], "cannot read /no/such.yaml"),
    ],
)
def test_bad_options_give_one_line_errors_and_exit_2(argv, message, capsys, tmp_path):
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_init_from_a_trained_net_a_checkpoint_copies_the_seven_layers(tmp_path):
    torch.manual_seed(0)
    trained_a = build_vgg("A", num_classes=4, width=1 / 16)
    ckpt.save_state(tmp_path, {"arch": "A", "width": 1 / 16, "classes": list("abcd"),
                               "model": trained_a.state_dict()})  # fmt: skip
    deep = build_vgg("E", num_classes=4, width=1 / 16)
    config = replace(demo("E"), init=str(tmp_path))
    copied = _initial_weights(deep, config)
    assert len(copied) == 7
    assert torch.equal(deep.features[0].weight, trained_a.features[0].weight)
    assert torch.equal(deep.classifier[6].weight, trained_a.classifier[6].weight)


def test_init_from_a_torchvision_state_dict_loads_every_tensor(tmp_path):
    import torchvision

    reference = torchvision.models.vgg11(num_classes=4)
    torch.save(reference.state_dict(), tmp_path / "vgg11.pth")
    model = build_vgg("A", num_classes=4)
    _initial_weights(model, replace(demo("A"), init=str(tmp_path / "vgg11.pth"), width=1.0))
    assert torch.equal(model.classifier[3].weight, reference.classifier[3].weight)


def test_init_with_weights_of_another_shape_is_a_clear_error(tmp_path):
    from vgg_ray.errors import ConfigError

    ckpt.save_state(tmp_path, {"arch": "B", "width": 1 / 8, "classes": list("abcd"),
                               "model": build_vgg("B", 4, 1 / 8).state_dict()})  # fmt: skip
    with pytest.raises(ConfigError, match="do not fit net B"):
        _initial_weights(build_vgg("B", 4, 1 / 16), replace(demo("B"), init=str(tmp_path)))


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])
    # row 0 right at top-1; rows 1, 2 wrong at top-1; with 3 classes top-5 is always right
    assert topk_correct(logits, labels).tolist() == [1, 3]
    assert topk_correct(logits, labels, ks=(1, 2)).tolist() == [1, 2]


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    results = []
    for chunks in (1, 4):
        torch.manual_seed(1)
        model = build_vgg("A", 4, 1 / 16, dropout=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        micro = list(zip(images.chunk(chunks), labels.chunk(chunks), strict=True))
        step = train_step(model, opt, micro)
        results.append((step.loss, step.correct.tolist(),
                        model.classifier[6].weight.detach().clone()))  # fmt: skip
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[0][1] == results[1][1]
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)


def _snapshot(model, optimizer) -> list:
    return [t.clone() for t in model.state_dict().values()] + [
        state["momentum_buffer"].clone() for state in optimizer.state.values()
    ]


def test_a_step_whose_gradient_is_not_finite_is_skipped():
    torch.manual_seed(0)
    model = build_vgg("A", 4, 1 / 16, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert train_step(model, opt, [(images, labels)]).applied  # fills the momentum buffers
    before = _snapshot(model, opt)
    weight = model.classifier[6].weight.detach().clone()

    poisoned = images.clone()
    poisoned[2, 0, 5, 5] = float("nan")  # one bad pixel: NaN loss, NaN gradient
    step = train_step(model, opt, [(images[:2], labels[:2]), (poisoned[2:], labels[2:])])
    assert not step.applied and math.isnan(step.grad_norm)
    # No update at all: weights, momentum and weight decay untouched.
    for got, want in zip(_snapshot(model, opt), before, strict=True):
        assert torch.equal(got, want)

    step = train_step(model, opt, [(images, labels)])
    assert step.applied and math.isfinite(step.loss)
    assert not torch.equal(model.classifier[6].weight, weight)


def test_clip_grad_norm_clips_like_torch_and_reports_the_norm_before():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(build_vgg("A", 4, 1 / 16, dropout=0.0))
    ours, reference = models
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    step = train_step(ours, opt, [(images, labels)], clip_grad_norm=0.002)

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(reference(images), labels).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.002)
    ref_opt.step()
    assert step.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert step.grad_norm > 0.004  # so the clip halves the gradient or more
    for got, want in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
