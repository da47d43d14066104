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
from vgg_ray.train import initial_weights


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
    copied = initial_weights(deep, config)
    assert len(copied) == 7
    assert torch.equal(deep.features[0].weight, trained_a.features[0].weight)
    assert torch.equal(deep.classifier[6].weight, trained_a.classifier[6].weight)


def test_init_from_a_torchvision_state_dict_loads_every_tensor(tmp_path):
    import torchvision

    reference = torchvision.models.vgg11(num_classes=4)
    torch.save(reference.state_dict(), tmp_path / "vgg11.pth")
    model = build_vgg("A", num_classes=4)
    initial_weights(model, replace(demo("A"), init=str(tmp_path / "vgg11.pth"), width=1.0))
    assert torch.equal(model.classifier[3].weight, reference.classifier[3].weight)


def test_a_torchvision_bn_file_of_1000_classes_fine_tunes_onto_fewer(tmp_path):
    torch.manual_seed(0)
    import torchvision

    reference = torchvision.models.vgg11_bn()  # ImageNet's 1000 classes
    torch.save(reference.state_dict(), tmp_path / "vgg11_bn.pth")
    model = build_vgg("A", num_classes=10, batch_norm=True)
    head = model.classifier[6].weight.clone()
    config = replace(demo("A"), init=str(tmp_path / "vgg11_bn.pth"), width=1.0, batch_norm=True)
    initial_weights(model, config)
    assert torch.equal(model.features[1].running_var, reference.features[1].running_var)
    assert torch.equal(model.classifier[3].weight, reference.classifier[3].weight)
    assert torch.equal(model.classifier[6].weight, head)  # the new class scores stay random


def test_init_with_weights_of_another_shape_is_a_clear_error(tmp_path):
    from vgg_ray.errors import ConfigError

    ckpt.save_state(tmp_path, {"arch": "B", "width": 1 / 8, "classes": list("abcd"),
                               "model": build_vgg("B", 4, 1 / 8).state_dict()})  # fmt: skip
    with pytest.raises(ConfigError, match="do not fit net B"):
        initial_weights(build_vgg("B", 4, 1 / 16), replace(demo("B"), init=str(tmp_path)))


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


def _parsed(*argv: str):
    from vgg_ray.cli import build_parser, train_config

    return train_config(build_parser().parse_args(["train", *argv]))


def test_a_fixed_scale_run_validates_at_its_own_scale():
    # Table 3: Q = S for a fixed S, Q = 384 for S in [256, 512].
    assert paper("D").data.validation_scale == 384
    assert paper("A").data.validation_scale == 256
    config = _parsed("--manifest", "/data/manifest.json", "--arch", "D", "--scale", "256")
    assert config.data.scale == (256, 256) and config.data.validation_scale == 256
    assert (
        _parsed("--manifest", "m", "--scale", "384", "--eval-scale", "400").data.validation_scale
        == 400
    )


def test_every_config_field_is_an_option_of_train():
    import dataclasses

    from vgg_ray.data import StreamConfig

    config = _parsed("--manifest", "m", "--arch", "D", "--dropout", "0.3", "--schedule", "cosine",
                     "--lr-patience", "5", "--batch-norm", "--base-init", "kaiming",
                     "--momentum", "0.8", "--warmup-epochs", "2", "--normalize", "torchvision",
                     "--shuffle-buffer", "64", "--no-channels-last")  # fmt: skip
    assert (config.dropout, config.schedule, config.lr_patience) == (0.3, "cosine", 5)
    assert config.batch_norm and config.base_init == "kaiming" and config.momentum == 0.8
    assert config.data.normalize == "torchvision" and config.data.shuffle_buffer == 64
    assert config.channels_last is False and config.warmup_epochs == 2
    from vgg_ray.cli import build_parser

    options = build_parser()._subparsers._group_actions[0].choices["train"]._option_string_actions
    for cls in (TrainConfig, StreamConfig):
        for spec in dataclasses.fields(cls):
            if spec.name != "data":
                assert "--" + spec.name.replace("_", "-") in options, spec.name


def test_the_deep_nets_paper_profile_starts_from_glorot_and_paper_init_warns():
    from vgg_ray.config import init_note

    assert paper("A").init == "paper" and init_note(paper("A")) is None
    for arch in ("B", "C", "D", "E"):
        assert paper(arch).init == "glorot"
        assert "Glorot" in init_note(paper(arch))
        assert "stalls" in init_note(paper(arch, init="paper"))
    assert init_note(paper("E", init="paper", batch_norm=True)) is None


def test_the_plateau_rule_does_not_decay_while_the_net_is_at_chance():
    from vgg_ray.schedules import build_schedule

    settings = dict(epochs=30, factor=0.1, patience=2, max_decays=3, step_size=1, warmup=1)
    schedule = build_schedule("plateau", classes=10, **settings)
    for _ in range(10):  # 10% accuracy on 10 classes: chance
        schedule.update(0.11)
    assert schedule.multiplier(10) == 1.0
    for accuracy in (0.4, 0.4, 0.4, 0.4):  # learning, then a plateau: the paper's decay
        schedule.update(accuracy)
    assert schedule.multiplier(14) == pytest.approx(0.1)


def test_the_small_profile_follows_the_data_sets_size():
    from vgg_ray.config import DataFacts, small

    tiny = small(facts=DataFacts(classes=10, train_images=1_200, short_side=32))
    assert (tiny.arch, tiny.width, tiny.batch_norm) == ("A", 0.25, True)
    assert tiny.data.crop == 32 and tiny.data.scale == (37, 48)
    assert tiny.schedule == "warmup_cosine" and 15 <= tiny.epochs <= 60
    photos = small(facts=DataFacts(classes=100, train_images=60_000, short_side=375))
    assert (photos.arch, photos.width, photos.data.crop) == ("D", 1.0, 64)
    assert small("E", facts=DataFacts(classes=10, train_images=500, short_side=90)).arch == "E"
    tiny.validate()


def test_every_command_config_field_is_an_option_described_by_its_docstring():
    """Each field of the configs behind evaluate, promote, register(-ensemble), stack, prepare,
    features and probe can be set from the command line (only `alias`, which promote alone moves
    to champion, and the stack's loopback host are left out), and each option's help says what
    it does."""
    import dataclasses

    from vgg_ray.cli import _config_of, build_parser
    from vgg_ray.evaluate_job import EvaluateConfig
    from vgg_ray.features_job import FeaturesConfig
    from vgg_ray.prepare import PrepareConfig
    from vgg_ray.probe import ProbeConfig
    from vgg_ray.registry import EnsembleConfig, PromoteConfig, RegisterConfig
    from vgg_ray.stack import StackConfig

    commands = build_parser()._subparsers._group_actions[0].choices
    left_out = {"alias", "host", "only_rows"}  # only_rows: reproduce's tables pick their rows
    for command, cls in [("evaluate", EvaluateConfig), ("promote", PromoteConfig),
                         ("register", RegisterConfig), ("register-ensemble", EnsembleConfig),
                         ("stack", StackConfig), ("prepare", PrepareConfig),
                         ("features", FeaturesConfig), ("probe", ProbeConfig)]:  # fmt: skip
        actions = {action.dest: action for action in commands[command]._actions}
        for spec in dataclasses.fields(cls):
            if spec.name not in left_out:
                assert spec.name in actions, (command, spec.name)
                assert actions[spec.name].help or not actions[spec.name].option_strings, spec.name
    args = build_parser().parse_args(["evaluate", "--model", "m", "--read-cpus", "0.25",
                                      "--max-images", "8"])  # fmt: skip
    config = _config_of(EvaluateConfig, args, tuples=("models", "modes", "scales"))
    assert (config.read_cpus, config.max_images, config.models) == (0.25, 8, ("m",))


def test_a_relative_manifest_path_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray Train workers run in working directories of their own: `--manifest shards` typed in
    the data's parent folder must reach them as an absolute path (an S3 URI stays as it is)."""
    from vgg_ray.train_job import resolve

    monkeypatch.chdir(tmp_path)
    local = resolve(replace(demo("A"), data=replace(demo("A").data, manifest="shards")))
    assert local.data.manifest == str(tmp_path / "shards")
    s3 = resolve(replace(demo("A"), data=replace(demo("A").data, manifest="s3://b/x")))
    assert s3.data.manifest == "s3://b/x"
