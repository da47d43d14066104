"""`vgg-ray localise`: Appendix A's test protocols over a split's boxes, Tables 8 and 9.

```
localisation nets (+ a classifier) --load, check--> ray.put
boxed val pieces --read_records (CPU tasks: JPEG bytes + boxes)--> LocaliseActor pool (GPU,
    else CPU): per image and row, right or wrong --> driver: sums --> table8/9.md, MLflow
```
- Protocol 1 (Table 8, to compare settings): the centre crop at Q = S; the net's box for the
  ground-truth class (PCR) or its one box (SCR), mapped back to the image, is right when its
  IoU with a ground-truth box of that class is above 0.5.
- Protocol 2 (Table 9, the full test): the net applied densely over the image rescaled to each Q
  (`evaluate.DenseNet`): every position of its output map is a box for the crop x crop window
  there. The classification net's dense class posteriors pick the image's top-5 classes and
  score each position's box by that class's posterior there; per class, the boxes of all
  positions and scales (and, for a fusion, of all nets: their union) are greedily merged
  (`boxes.merge`, OverFeat's) and the best merged box is the guess. The ILSVRC measure: the
  image is right when one of its 5 (class, box) guesses names a ground-truth class with IoU >
  0.5 (`boxes.localisation_error`).

Only the images of the split's shards with boxes are evaluated (`vgg-ray prepare --boxes`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from vgg_ray import boxes as B
from vgg_ray.data import read_records
from vgg_ray.errors import ConfigError, require, user_error
from vgg_ray.evaluate import STRIDE, NetInfo, NetScorer, single_scale
from vgg_ray.evaluate_job import (
    Inference,
    LoadedNet,
    Progress,
    _client,
    _pieces,
    actor_device,
    actor_pool,
    batch_inference,
    check_wnids,
    decode_on,
    load_net,
    read_kwargs,
    resolve,
)
from vgg_ray.manifest import Manifest, check_shards, load_manifest
from vgg_ray.transforms import EvalPreset

# The paper's figures (top-5 localisation error, % on ILSVRC-2012 val), for the tables' last
# column. Table 8: (fine-tuned layers, regression) at S = Q = 384, protocol 1.
PAPER_TABLE8 = {("fc", "scr"): 36.4, ("fc", "pcr"): 34.3, ("all", "pcr"): 33.1}
# Table 9: PCR, all layers, protocol 2: (training scales of the nets, test scales Q).
PAPER_TABLE9 = {
    ((256,), (256,)): 29.5,
    ((384,), (384,)): 28.2,
    ((384,), (352, 384)): 27.5,
    ((256, 384), (256, 384)): 26.9,  # fusion of the 256 and 384 nets, each at its own Q
}


@dataclass(frozen=True, kw_only=True)
class LocaliseConfig(Inference):
    """One localisation evaluation: which nets, on which data, under which protocols."""

    models: tuple[str, ...] = ()
    """Localisation nets (`vgg-ray train --regression scr|pcr`): each a checkpoint, `runs:/`,
    a run id or `models:/`. Several: also their fusion (protocol 2: the union of their boxes)."""
    classifier: str = ""
    """The classification net whose dense class scores pick protocol 2's top-5 classes and rate
    its boxes; "": protocol 1 only."""
    protocols: tuple[int, ...] = ()
    """1 (centre crop, ground-truth class: Table 8) and/or 2 (dense, top-5: Table 9); ():
    both where a classifier is given, else 1."""
    scales: tuple[tuple[int, ...], ...] = ()
    """Protocol 2: further test scale sets (e.g. (352, 384), Table 9), each a row per net (and
    for their fusion) besides the rows at each net's training scale, Q = S."""
    manifest: str = ""
    """The shards' manifest; "" = the one the first net was trained on."""
    split: str = "val"
    """The manifest's split to evaluate (its images with boxes)."""
    s3_endpoint: str | None = None
    """For data or checkpoints on S3; default AWS_ENDPOINT_URL(_S3) or AWS."""
    max_images: int = 0
    """Evaluate only the split's first N images with boxes (0: all)."""
    batch_size: int = 16
    """Images per Ray batch handed to an actor (each is rated under every row)."""
    tracking_uri: str = ""
    """MLflow; "" = MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db."""
    experiment: str = "vgg-ray"
    """The experiment of the `localise-*` run this job logs its tables to."""
    log_to_mlflow: bool = True
    """Log the tables and errors to a new MLflow run."""
    output: str = ""
    """Local folder for the tables; "" = <home>/localisation/<time>."""
    progress_every: int = 1000
    """Print a progress line every this many images."""

    def validate(self) -> LocaliseConfig:
        checks = [
            (bool(self.models), "no localisation net given: pass --model (a checkpoint, run or "
             "models:/ of `vgg-ray train --regression pcr`)"),
            (set(self.protocols) <= {1, 2}, f"protocols are 1 and 2, got {self.protocols}"),
            (2 not in self.protocols or bool(self.classifier), "protocol 2 rates boxes by a "
             "classification net's scores: pass --classifier"),
            (all(qs and all(q >= 1 for q in qs) for qs in self.scales),
             f"test scales must be >= 1, got {self.scales}"),
            (self.max_images >= 0, "max_images must be >= 0"),
            *self.inference_checks(),
            (self.progress_every >= 1, "progress_every must be >= 1"),
        ]  # fmt: skip
        require(checks)
        return self

    @property
    def chosen_protocols(self) -> tuple[int, ...]:
        return self.protocols or ((1, 2) if self.classifier else (1,))


@dataclass(frozen=True)
class Row:
    """One line of Table 8 (protocol 1: one net) or Table 9 (protocol 2: a net or a fusion)."""

    protocol: int
    members: tuple[int, ...]  # indices of the localisation nets
    scales: tuple[tuple[int, ...], ...]  # each member's test scales Q

    def key(self, infos: list[NetInfo]) -> str:
        """A metric-name-safe id, e.g. "p2_D-pcr-all-S384_Q352-384", or for a fusion
        "p2_fusion_D-pcr-all-S256_Q256__Dn2-pcr-all-S384_Q384"."""
        parts = [f"{infos[i].name}-{infos[i].regression}-{infos[i].finetune}-S"
                 f"{infos[i].train_scale[0]}_Q{'-'.join(map(str, q))}"
                 for i, q in zip(self.members, self.scales, strict=True)]  # fmt: skip
        fused = "fusion_" if len(parts) > 1 else ""  # MLflow's metric names allow no "+"
        return f"p{self.protocol}_{fused}" + "__".join(parts).replace("#", "n")


def plan_rows(infos: list[NetInfo], config: LocaliseConfig) -> list[Row]:
    """Protocol 1: a row per net at Q = S. Protocol 2: for Q = S and for each set of `scales`, a
    row per net and, with several nets, their fusion."""
    rows = []
    if 1 in config.chosen_protocols:
        rows += [Row(1, (i,), ((single_scale(n),),)) for i, n in enumerate(infos)]
    if 2 in config.chosen_protocols:
        for chosen in dict.fromkeys(((), *config.scales)):
            scales = [tuple(chosen) or (single_scale(n),) for n in infos]
            rows += [Row(2, (i,), (scales[i],)) for i in range(len(infos))]
            if len(infos) > 1:
                rows.append(Row(2, tuple(range(len(infos))), tuple(scales)))
    return rows


# --- the Ray side --------------------------------------------------------------------------


def _position_boxes(output_map: torch.Tensor, crop: int) -> np.ndarray:
    """A dense localisation map (outputs, h, w) -> boxes (classes or 1, h * w, 4) in pixels of
    the rescaled image: position (i, j) predicts in the crop x crop window at (32 i, 32 j)."""
    outputs, height, width = output_map.shape
    targets = output_map.permute(1, 2, 0).reshape(height * width, -1, 4).transpose(0, 1)
    boxes = B.from_target(targets.cpu().numpy(), crop).reshape(targets.shape)
    rows, cols = np.divmod(np.arange(height * width), width)
    offsets = np.stack([cols, rows, cols, rows], axis=1) * STRIDE
    return boxes + offsets[None]


class Localiser:
    """Appendix A's two ways to localise, on one image on one device: `centre_crop_box`
    (protocol 1) and `top5` (protocol 2), for the localisation nets and the classifier given
    (`NetScorer`s). Per image, each (net, Q)'s dense boxes and each Q's class posteriors are
    computed once, however many rows use them. What the evaluation actors and the registered
    model (`vgg_ray.localiser_model`) both run."""

    def __init__(self, nets: list[NetScorer], classifier: NetScorer | None):
        self.nets, self.classifier = nets, classifier
        self._image: torch.Tensor | None = None
        self._boxes: dict[tuple[int, int], np.ndarray] = {}  # (net, Q) -> boxes per class, px
        self._scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # Q -> posteriors

    def centre_crop_box(self, net: int, image: torch.Tensor, q: int, label: int) -> np.ndarray:
        """Protocol 1: net `net`'s box for class `label` on the centre crop at Q, in the
        image's pixels."""
        scorer = self.nets[net]
        crop = scorer.info.crop
        prepared = EvalPreset(scale=q, crop=crop).prepare([image])
        output = scorer.outputs(prepared.pixels)[0].view(-1, 4)
        target = output[label if scorer.info.regression == "pcr" else 0].cpu().numpy()
        return B.out_of_window(B.from_target(target, crop), prepared.windows[0], crop)[0]

    def top5(
        self, image: torch.Tensor, members: tuple[int, ...], scales: tuple[tuple[int, ...], ...]
    ) -> list[tuple[int, float, np.ndarray]]:
        """Protocol 2: the image's top-5 classes by the classifier's dense posteriors (averaged
        over the scales), each with its posterior and its box: the boxes of every position of
        every (net, Q) (each net its scales; several nets: their union) merged greedily, the
        best merged box. In the image's pixels."""
        if image is not self._image:
            self._image, self._boxes, self._scores = image, {}, {}
        keys = [(m, q) for m, qs in zip(members, scales, strict=True) for q in qs]
        for member, q in keys:
            if (member, q) not in self._boxes:
                self._boxes[member, q] = self._dense_boxes(self.nets[member], image, q)
            if q not in self._scores:
                self._scores[q] = self._class_scores(image, q)
        mean = torch.stack([self._scores[q][0] for _, q in keys]).mean(dim=0)
        top = mean.topk(min(5, len(mean)))
        guesses = []
        for score, c in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            boxes, weights = [], []
            for member, q in keys:
                per_class = self.nets[member].info.regression == "pcr"
                boxes.append(self._boxes[member, q][c if per_class else 0])
                # the same map size: the nets share the crop (`load_localisation_nets`)
                weights.append(self._scores[q][1][c].flatten().numpy().astype(np.float64))
            merged, _ = B.merge(np.concatenate(boxes), np.concatenate(weights))
            guesses.append((c, score, merged[0]))
        return guesses

    def _dense_boxes(self, net: NetScorer, image: torch.Tensor, q: int) -> np.ndarray:
        """Every position's box(es) at Q, (classes or 1, positions, 4), in the image's pixels."""
        rescaled = TF.resize(image, [q], antialias=True)
        boxes = _position_boxes(net.dense_map(rescaled), net.info.crop)
        size, rescaled_size = tuple(image.shape[-2:]), tuple(rescaled.shape[-2:])
        return B.rescale(boxes.reshape(-1, 4), rescaled_size, size).reshape(boxes.shape)

    def _class_scores(self, image: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier at Q: the image's dense posteriors (flip-averaged, Sect. 3.2) and the
        posterior map (classes, h, w) that rates each position's box."""
        if self.classifier is None:
            raise ConfigError("protocol 2 rates boxes by a classification net: give a classifier")
        rescaled = TF.resize(image, [q], antialias=True)
        posteriors = self.classifier.dense([rescaled])[0].cpu()
        return posteriors, self.classifier.dense_map(rescaled).softmax(dim=0).cpu()


def scorers(nets: list[LoadedNet], classifier: LoadedNet | None, device: torch.device, *,
            max_crops: int = 64, bf16: bool | None = None) -> Localiser:  # fmt: skip
    """A `Localiser` of loaded nets on `device` (bf16 None: on a GPU)."""
    on_gpu = device.type == "cuda"
    options = dict(max_crops=max_crops, bf16=on_gpu if bf16 is None else bf16,
                   channels_last=on_gpu)  # fmt: skip
    return Localiser(
        [NetScorer(n.model, n.info, device, **options) for n in nets],
        NetScorer(classifier.model, classifier.info, device, **options) if classifier else None,
    )


class LocaliseActor:
    """A Ray Data actor: the localisation nets and the classifier on its device; per batch,
    decodes the JPEGs there and returns, per image and row, whether it is localised right
    (`ok` False where a record did not decode or has no box of its class)."""

    def __init__(self, nets_ref: list, rows: list[Row], max_crops: int, bf16: bool | None,
                 threads: int):  # fmt: skip
        import ray

        nets, classifier = ray.get(nets_ref[0])
        self.device = actor_device(threads)
        self.localiser = scorers(nets, classifier, self.device, max_crops=max_crops, bf16=bf16)
        self.rows = rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = decode_on(self.device, list(batch["image"]))
        right = np.zeros((len(images), len(self.rows)), bool)
        ok, whole = np.zeros(len(images), bool), np.zeros(len(images), bool)
        for i, image in enumerate(images):
            label = int(batch["label"][i])
            truths = [(int(c), box) for c, *box in batch["boxes"][i].tolist()]
            if image is None or label < 0 or not any(c == label for c, _ in truths):
                continue
            ok[i] = True
            right[i] = [self._right(row, image, label, truths) for row in self.rows]
            height, width = image.shape[-2:]
            whole[i] = B.localisation_error([[(label, (0, 0, width, height))]], [truths]) == 0
        return {"key": batch["key"], "label": batch["label"], "ok": ok, "right": right,
                "whole_image": whole}  # fmt: skip

    def _right(self, row: Row, image: torch.Tensor, label: int, truths: list) -> bool:
        if row.protocol == 1:
            box = self.localiser.centre_crop_box(row.members[0], image, row.scales[0][0], label)
            same_class = [b for c, b in truths if c == label]
            return bool(B.iou([box], same_class).max() > B.IOU_CORRECT)
        guesses = self.localiser.top5(image, row.members, row.scales)
        return B.localisation_error([[(c, box) for c, _, box in guesses]], [truths]) == 0


# --- the job -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalisationResult:
    rows: list[dict]  # per row: protocol, nets, regression, finetune, S, Q, error, images, paper
    output: str
    run_id: str | None = None
    skipped: int = 0  # records that did not decode or have no box of their class
    baseline: float = 1.0  # the error of the whole image as the box of the true class
    per_image: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # key -> right


def load_localisation_nets(config: LocaliseConfig) -> tuple[list[LoadedNet], LoadedNet | None,
                                                            Manifest]:  # fmt: skip
    """The localisation nets and the classifier, checked against the manifest and each other."""
    load = lambda source: load_net(source, tracking_uri=config.tracking_uri,  # noqa: E731
                                   s3_endpoint=config.s3_endpoint)  # fmt: skip
    nets = [load(source) for source in config.models]
    for net in nets:
        if not net.info.regression:
            raise ConfigError(f"model {net.info.source} is a classifier, not a localisation net: "
                              "train one with `vgg-ray train --regression pcr --init <it>`, or "
                              "pass it as --classifier")  # fmt: skip
    classifier = load(config.classifier) if config.classifier else None
    if classifier is not None and classifier.info.regression:
        raise ConfigError(f"--classifier {config.classifier} is a localisation net; protocol 2 "
                          "needs a classification net")  # fmt: skip
    uri = config.manifest or nets[0].info.manifest
    if not uri:
        raise ConfigError(f"no --manifest given and {config.models[0]} does not name the data "
                          "it was trained on")  # fmt: skip
    manifest = load_manifest(uri, s3_endpoint=config.s3_endpoint)
    shards = manifest.shards(config.split, boxed=True)  # no boxes: the one line, before work
    check_shards(dataclasses.replace(manifest, splits={config.split: shards}))
    seen: dict[str, int] = {}
    for i, net in enumerate(nets):
        info = net.info
        seen[info.name] = seen.get(info.name, 0) + 1
        if seen[info.name] > 1:
            info = dataclasses.replace(info, name=f"{info.name}#{seen[info.name]}")
        nets[i] = LoadedNet(
            net.model, dataclasses.replace(info, stats=info.stats or manifest.stats)
        )
        check_wnids(nets[i], manifest)
    if classifier is not None:
        check_wnids(classifier, manifest)
        stats = classifier.info.stats or manifest.stats
        classifier = LoadedNet(classifier.model, dataclasses.replace(classifier.info, stats=stats))
    if 2 in config.chosen_protocols:
        for net in [*nets, classifier]:
            if net.info.crop % STRIDE or net.info.crop != classifier.info.crop:
                raise ConfigError(f"protocol 2 runs {net.info.source} densely beside the "
                                  f"classifier: its training crop {net.info.crop} must be the "
                                  f"classifier's ({classifier.info.crop}), a multiple of "
                                  f"{STRIDE}")  # fmt: skip
    return nets, classifier, manifest


def table_rows(rows: list[Row], infos: list[NetInfo], right: np.ndarray, images: int) -> list[dict]:
    """Each row's figures, with the paper's where its setting is one of Tables 8 and 9."""
    out = []
    errors = 1 - right / max(images, 1)  # right: each row's count of images right
    for row, error in zip(rows, errors, strict=True):
        nets = [infos[i] for i in row.members]
        train = tuple(n.train_scale[0] for n in nets)
        first = nets[0]
        if row.protocol == 1:  # (Table 8 is at S = Q = 384)
            paper = (
                PAPER_TABLE8.get((first.finetune, first.regression)) if train == (384,) else None
            )
        else:
            tests = tuple(q for qs in row.scales for q in qs)
            same = all(n.regression == "pcr" and n.finetune == "all" for n in nets)
            paper = PAPER_TABLE9.get((train, tests)) if same else None
        out.append({
            "protocol": row.protocol, "key": row.key(infos),
            "nets": "+".join(n.name for n in nets),
            "regression": ",".join(n.regression.upper() for n in nets),
            "finetune": ",".join("all layers" if n.finetune == "all" else "FC1-FC2"
                                 for n in nets),
            "train_scale": ",".join(map(str, train)),
            "test_scales": "; ".join(",".join(map(str, qs)) for qs in row.scales),
            "error": float(error), "images": images, "paper": paper,
        })  # fmt: skip
    return out


def table8_markdown(results: list[dict]) -> str:
    """Table 8's layout: protocol 1 (centre crop, ground-truth class)."""
    lines = ["| ConvNet | fine-tuned layers | regression type | train S | test Q | GT class "
             "localisation error (%) | paper (%) |", "|---|---|---|---|---|---:|---:|"]  # fmt: skip
    for r in (r for r in results if r["protocol"] == 1):
        paper = f"{r['paper']:.1f}" if r["paper"] is not None else "-"
        lines.append(f"| {r['nets']} | {r['finetune']} | {r['regression']} | {r['train_scale']} "
                     f"| {r['test_scales']} | {100 * r['error']:.1f} | {paper} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def table9_markdown(results: list[dict]) -> str:
    """Table 9's layout: protocol 2 (dense, top-5 classes, merged boxes)."""
    lines = ["| ConvNet | fine-tuned layers | regression type | train S | test Q | top-5 "
             "localisation error, val (%) | paper (%) |",
             "|---|---|---|---|---|---:|---:|"]  # fmt: skip
    for r in (r for r in results if r["protocol"] == 2):
        paper = f"{r['paper']:.1f}" if r["paper"] is not None else "-"
        name = r["nets"] if "+" not in r["nets"] else f"fusion {r['nets']}"
        lines.append(f"| {name} | {r['finetune']} | {r['regression']} | {r['train_scale']} | "
                     f"{r['test_scales']} | {100 * r['error']:.1f} | {paper} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def results_csv(results: list[dict]) -> str:
    buffer = io.StringIO()
    columns = ["protocol", "nets", "regression", "finetune", "train_scale", "test_scales",
               "error", "images", "paper"]  # fmt: skip
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
    return buffer.getvalue()


def _run(config: LocaliseConfig, nets: list[LoadedNet], classifier: LoadedNet | None,
         rows: list[Row], manifest: Manifest) -> tuple[np.ndarray, int, dict, int]:  # fmt: skip
    """The Ray Data pipeline: each row's count of images right, the records skipped, per image
    right or wrong per row, and the images the whole-image box alone gets right."""
    import ray

    from vgg_ray import runtime

    runtime.connect()
    actors, gpus = pool = actor_pool(config.actors, config.gpus_per_actor)
    pieces = _pieces(manifest, config.split, config.max_images, boxed=True)
    total = sum(p["stop"] - p["start"] for p in pieces)
    print(f"vgg-ray localise: {total} images with boxes of split {config.split!r}, {len(rows)} "
          f"row(s), {actors} actor(s) with {gpus} GPU each", flush=True)  # fmt: skip
    batches = batch_inference(pieces, read_records, read_kwargs(manifest, boxes=True),
                              LocaliseActor, {"nets_ref": [ray.put((nets, classifier))],
                                              "rows": rows}, config, pool)  # fmt: skip
    right, skipped, per_image, whole = np.zeros(len(rows), np.int64), 0, {}, 0
    progress = Progress("localise", total, config.progress_every)
    for batch in batches:
        ok = batch["ok"]
        skipped += int((~ok).sum())
        right += batch["right"][ok].sum(axis=0)
        whole += int(batch["whole_image"][ok].sum())
        per_image.update({str(k): r for k, r, good in zip(batch["key"], batch["right"], ok,
                                                          strict=True) if good})  # fmt: skip
        progress.add(len(ok))
    return right, skipped, per_image, whole


def _log_mlflow(config: LocaliseConfig, nets: list[LoadedNet], classifier: LoadedNet | None,
                results: list[dict], directory: Path) -> str:  # fmt: skip
    """A `localise-<nets>` run: the settings, each row's error, the tables; tags link the nets'
    training runs."""
    from vgg_ray.tracking import experiment_id

    client = _client(config.tracking_uri)
    tags = {f"member_{i}": n.info.source for i, n in enumerate(nets)}
    tags.update({f"member_{i}_run": n.info.run_id for i, n in enumerate(nets) if n.info.run_id})
    if classifier is not None:
        tags["classifier"] = classifier.info.source
    name = "localise-" + "+".join(n.info.name for n in nets)
    run = client.create_run(experiment_id(client, config.experiment), run_name=name, tags=tags)
    run_id = run.info.run_id
    params = {"split": config.split, "protocols": ",".join(map(str, config.chosen_protocols)),
              "scales": "; ".join(",".join(map(str, qs)) for qs in config.scales) or "S",
              "max_images": config.max_images}  # fmt: skip
    import mlflow.entities

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(f"loc_error_{r['key']}", r["error"], now, 0)
                 for r in results],
        params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()],
        synchronous=True,
    )  # fmt: skip
    client.log_artifacts(run_id, str(directory), "localisation")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def localise(config: LocaliseConfig) -> LocalisationResult:
    """The whole job: load and check the nets, run the protocols over the split's boxed images,
    write and log Tables 8 and 9. What `vgg-ray localise` and jobs/evaluate_localisation.py call."""
    config = resolve(config, "localisation").validate()
    if config.tracking_uri.startswith("sqlite:///"):
        Path(config.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    nets, classifier, manifest = load_localisation_nets(config)
    infos = [n.info for n in nets]
    rows = plan_rows(infos, config)
    try:
        right, skipped, per_image, whole = _run(config, nets, classifier, rows, manifest)
    except Exception as error:  # a shard broken since the check, storage down past its limit
        if cause := user_error(error):
            raise ConfigError(cause) from None
        raise
    if not per_image:
        raise ConfigError(f"no image of split {config.split!r} with a box of its class could "
                          "be decoded")  # fmt: skip
    results = table_rows(rows, infos, right, len(per_image))
    # The floor every net must clear: the true class with a box over the whole image.
    baseline = 1 - whole / len(per_image)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    tables = {"table8.md": table8_markdown(results) if 1 in config.chosen_protocols else "",
              "table9.md": table9_markdown(results) if 2 in config.chosen_protocols else "",
              "results.csv": results_csv(results)}  # fmt: skip
    for name, text in tables.items():
        if text:
            (output / name).write_text(text)
    run_id = None
    if config.log_to_mlflow:
        with tempfile.TemporaryDirectory() as directory:
            for name in tables:
                if (output / name).exists():
                    Path(directory, name).write_text((output / name).read_text())
            run_id = _log_mlflow(config, nets, classifier, results, Path(directory))
    print("".join(text + "\n" for text in (tables["table8.md"], tables["table9.md"]) if text)
          + f"{len(per_image)} images evaluated; the whole image as the box of the true class: "
          f"{100 * baseline:.1f}% error", flush=True)  # fmt: skip
    print(f"vgg-ray localise: tables in {output}"
          + (f"; {skipped} record(s) skipped (did not decode, or no box of their class)"
             if skipped else "")
          + (f"; logged to MLflow run {run_id}" if run_id else ""), flush=True)  # fmt: skip
    return LocalisationResult(results, str(output), run_id, skipped, per_image, baseline)
