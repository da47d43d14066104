"""The training plane's worker: the paper's recipe (Sect. 3.1) on one Ray Train worker.

`train_worker` is what Ray Train runs on every worker: a `Worker` trains an epoch, validates,
logs and checkpoints, epoch after epoch. It is plain PyTorch; the few Ray calls
(`get_context`, `get_checkpoint`, `report`) stand at its edges. The driver that starts the
workers and tracks the run is `vgg_ray.train_job`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vgg_ray import checkpoint as ckpt
from vgg_ray.config import TrainConfig
from vgg_ray.data import TRACE, SplitStream, trace
from vgg_ray.errors import ConfigError
from vgg_ray.manifest import load_manifest
from vgg_ray.models import INITS, VGG, build_vgg, head_size, init_box_head, init_from_shallow
from vgg_ray.parallel import all_reduce, parallelize, unwrap
from vgg_ray.schedules import build_schedule
from vgg_ray.steps import Classification, evaluate_counts, objective, sgd, train_step
from vgg_ray.tracking import NullTracker, Tracker, use_store

log = logging.getLogger("vgg_ray.train")
SCORE = Classification.score  # the paper's measure
# What the best checkpoints are kept by: top-5 error, ties broken by top-1 error (a
# localisation net's: its localisation error, ties broken by the loss). The weight is below
# one image in a million, so it only ever decides between equal top-5 errors (every epoch's on
# a data set of 5 classes or fewer, where top-5 error is 0).
RANK = "checkpoint_rank"
TIE_BREAK = 1e-6
# Every this many steps all ranks ask Ray whether a node of the run is being reclaimed (spot
# capacity): the call is a barrier over the workers, so not every step. At 0.1-1 s a step the
# checkpoint starts within seconds of the notice, well inside a cloud's 30 s to 2 min warning.
PREEMPTION_POLL_STEPS = 10
# Set by a SIGTERM to this worker process: what a spot node's shutdown sends.
SIGTERM_RECEIVED = threading.Event()


HEAD = "classifier.6."  # FC3: the class scores


def initial_weights(model: VGG, config: TrainConfig) -> list[str]:
    """Apply `config.init` when it names trained weights; returns the layers it set. (The
    driver's pre-flight, `train_job.check_init`, runs it on the meta device.)"""
    if config.init in INITS:
        return []
    try:
        trained, state = ckpt.load_trained(config.init, s3_endpoint=config.data.s3_endpoint)
    except (OSError, RuntimeError, ValueError) as error:  # unreadable, not a torch file, ...
        raise ConfigError(
            f"cannot load init {config.init}: {str(error).splitlines()[0][:200]}"
        ) from error
    trained_arch = state.get("arch")
    if config.regression and trained_arch and trained_arch != config.arch:
        raise ConfigError(f"init {config.init} is a trained net {trained_arch}; a localisation "
                          f"net {config.arch} starts from a classifier of the same net "
                          "(Appendix A)")  # fmt: skip
    if trained is not None and _conv_layers(trained) < _conv_layers(model):
        return init_from_shallow(model, trained)  # Sect. 3.1: deep nets start from a trained A
    loaded = dict(state["model"])
    head = model.classifier[-1].weight
    same_task = state.get("config", {}).get("regression", "") == config.regression
    if not same_task or loaded.get(HEAD + "weight", head).shape[0] != head.shape[0]:
        # Fine-tuning on another class count (ImageNet's 1000 to one's own 10), or a
        # classifier becoming a localisation net (Appendix A): every layer but the last, which
        # keeps its random init.
        loaded = {k: v for k, v in loaded.items() if not k.startswith(HEAD)}
    own_head = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD)}
    try:
        model.load_state_dict({**own_head, **loaded}, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"init {config.init}: weights do not fit net {config.arch} "
            f"(width {config.width}, {model.num_classes} classes): {str(error).splitlines()[0]}"
        ) from error
    return list(loaded)


def val_errors_line(metrics: dict[str, float]) -> str:
    """ "val error top-1 12.0% top-5 3.1%", or a localisation net's "val localisation error
    40.2%" (centre crop, ground-truth class)."""
    if "val_loc_error" in metrics:
        return f"val localisation error {100 * metrics['val_loc_error']:.1f}%"
    return (f"val error top-1 {100 * metrics['val_top1_error']:.1f}% top-5 "
            f"{100 * metrics[SCORE]:.1f}%")  # fmt: skip


def _conv_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def _on_sigterm(signum: int, frame: Any) -> None:
    SIGTERM_RECEIVED.set()


def _install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def catch_sigterm() -> None:
    """Take a SIGTERM to this worker as its node's preemption (`Worker._preemption_notice`)
    instead of dying at once, which Ray would count as a failure and which would lose the steps
    since the last checkpoint. Python runs signal handlers on a process's main thread, where a
    Ray Train worker runs its actor's task loop (the training function has a thread of its
    own), so the actor installs the handler there, through the method Ray Train itself runs
    set-up on workers with."""
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_sigterm_handler))
    except Exception as error:  # another Ray version's worker: a SIGTERM then ends it at once
        log.warning("a SIGTERM will stop this worker without a checkpoint (%s)",
                    str(error).splitlines()[0][:200])  # fmt: skip


def drain_own_node(notice_s: float) -> bool:
    """Ask Ray to drain this worker's node for preemption, `notice_s` from now: what a cloud
    autoscaler does on a spot warning. Ray Train then restarts the run without the node and
    counts it against `max_preemptions`. Not the head node: it holds the cluster and the run's
    driver, there is nowhere to go on without it. True where Ray accepted."""
    import ray
    from ray.core.generated import autoscaler_pb2

    context = ray.get_runtime_context()
    node = context.get_node_id()
    if any(n["NodeID"] == node and "node:__internal_head__" in n["Resources"]
           for n in ray.nodes()):  # fmt: skip
        return False
    gcs = ray._raylet.GcsClient(address=context.gcs_address)  # what `ray drain-node` calls
    accepted, why = gcs.drain_node(
        node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "SIGTERM to a training worker", int((time.time() + notice_s) * 1000),
    )  # fmt: skip
    if not accepted:
        log.warning("Ray did not accept draining node %s: %s", node[:8], why)
    return accepted


@dataclass
class LoopState:
    """Where the loop stands: what a checkpoint carries (as a dict, `state["loop"]`) so that a
    restart continues exactly."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done, over the whole run
    # steps done in the current epoch (> 0: a mid-epoch checkpoint). With the global batch it
    # is where the epoch stands in its global order (`data.EpochOrder`), whatever the worker
    # count: a resume starts there
    batch_in_epoch: int = 0
    workers: int = 0  # the worker count that wrote the checkpoint (0: unknown, older ones)
    history: list[dict[str, float]] = field(default_factory=list)  # each epoch's metrics
    # the current epoch's training sums so far over all ranks (a mid-epoch checkpoint's)
    epoch_sums: list[float] | None = None
    nonfinite_steps: int = 0  # steps skipped this epoch (gradient not finite)
    nonfinite_streak: int = 0  # of them, in a row up to now

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        known = {f.name for f in dataclasses.fields(cls)}  # (older checkpoints kept "best")
        return cls(**{k: v for k, v in values.items() if k in known})


class Worker:
    """One Ray Train worker: the net, its optimizer and lr schedule, and the loop state that a
    checkpoint carries so a restart continues exactly (epoch, step, batch in epoch, history).

    Plain PyTorch; the Ray calls (`get_context`, `get_checkpoint`, `report`) stand at the edges.
    """

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        config = TrainConfig.from_dict(loop_config["config"])
        # One seed per run: it also draws the data order and augmentation.
        self.config = config = replace(config, data=replace(config.data, seed=config.seed))
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        on_gpu = self.device.type == "cuda"
        self.bf16 = config.bf16 if config.bf16 is not None else on_gpu
        self.channels_last = config.channels_last if config.channels_last is not None else on_gpu
        self.manifest = load_manifest(config.data.manifest, s3_endpoint=config.data.s3_endpoint)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        init = config.init if config.init in INITS else config.base_init
        self.objective = objective(config.regression)
        self.boxes = bool(config.regression)  # localisation: the shards' images with boxes
        outputs = head_size(len(self.manifest.classes), config.regression)
        model = build_vgg(config.arch, outputs, config.width, init, config.dropout,
                          config.batch_norm)  # fmt: skip
        self.optimizer = sgd(model, lr=config.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay)  # fmt: skip
        # The paper's default: "divided by 10 when the validation set accuracy stopped
        # improving", 3 times. The schedule gives a multiplier on config.lr (vgg_ray.schedules).
        self.schedule = build_schedule(
            config.schedule, epochs=config.epochs, factor=config.lr_factor,
            patience=config.lr_patience, max_decays=config.lr_decays,
            step_size=config.step_size, warmup=config.warmup_epochs,
            classes=len(self.manifest.classes),
        )  # fmt: skip
        self.loop = LoopState()
        # test-only: where to log what was read and trained on (`data.trace`)
        self.trace = os.environ[TRACE] = loop_config.get("trace", "")
        self.preempted = False  # this attempt has checkpointed for a preemption
        catch_sigterm()
        # The run's own latest checkpoint first (a worker failure, a resumed run); else the
        # checkpoint the run is told to start from (a Tune trial continuing a donor's or its own).
        own = ray.train.get_checkpoint()
        restored = own or loop_config.get("start_checkpoint")
        unsent: list = []
        if restored:
            state = ckpt.load_newest_intact(restored)
            self._load(model, state)
            if own:  # its unsent metrics are this run's (a donor's belong to the donor's run)
                unsent = state.get("unsent_metrics", [])
        else:
            if config.init.startswith(("models:/", "runs:/")):  # resolved in the run's store
                use_store(config.tracking_uri)
            loaded = initial_weights(model, config)
            if config.regression and not any(k.startswith(HEAD[:-1]) for k in loaded):
                init_box_head(model)
        if config.finetune == "fc":  # Table 8: only FC1-FC3 learn; DDP skips frozen weights
            model.features.requires_grad_(False)
        self.model = parallelize(model, self.device, channels_last=self.channels_last,
                                 compile=config.compile)  # fmt: skip
        self.tracker = (Tracker(config.tracking_uri, loop_config["mlflow_run_id"])
                        if self.rank == 0 else NullTracker())  # fmt: skip
        self.tracker.requeue(unsent)
        before, self.loop.workers = self.loop.workers, self.world_size
        if self.rank == 0:
            self._announce_workers(before)

    def _announce_workers(self, before: int) -> None:
        """One line where the run continues on another worker count than its checkpoint's (an
        elastic run that lost or regained workers), and the count as a metric over steps."""
        loop, now = self.loop, self.world_size
        if before and before != now:
            change = (f"{before - now} of {before} workers lost" if now < before
                      else f"{now - before} joined, {before} -> {now}")  # fmt: skip
            log.warning("%s; continuing on %d at epoch %d, sample %s of %s", change, now,
                        loop.epoch + 1, f"{loop.batch_in_epoch * self.config.global_batch:,}",
                        f"{self.manifest.rows('train'):,}")  # fmt: skip
        self.tracker.log_metrics({"workers": float(now)}, step=loop.step)

    def train(self) -> None:
        """Epochs from where the loop state says, each: train -> validate -> log -> checkpoint."""
        config, loop = self.config, self.loop
        for epoch in range(loop.epoch, config.epochs):
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * self.schedule.multiplier(epoch)
            trained = self.train_epoch(epoch)
            if trained is None:  # diverged: train_epoch checkpointed the weights from before
                break
            metrics = self._metrics(epoch, trained, self.validate())
            self.schedule.update(1 - metrics[self.objective.plateau])
            loop.epoch, loop.batch_in_epoch, loop.epoch_sums = epoch + 1, 0, None
            loop.history.append(metrics)
            self.tracker.log_metrics(metrics, step=epoch)
            if self.rank == 0:  # print() in a Ray Train worker can reach the driver twice
                log.info(
                    "epoch %d/%d: train loss %.3f, %s, %.0f img/s, %.0f%% of step time waiting "
                    "for data", epoch + 1, config.epochs, metrics["train_loss"],
                    val_errors_line(metrics), metrics["images_per_s"],
                    100 * metrics["data_wait_share"],
                )  # fmt: skip
            self.report(metrics, is_epoch_end=True)
        # Nothing is sent after the last checkpoint: what it carries unsent, the driver delivers.
        if unsent := len(self.tracker.unsent()):
            log.warning("%d metric values could not be sent to MLflow yet; the driver will "
                        "deliver them", unsent)  # fmt: skip

    def train_epoch(self, epoch: int) -> list[float] | None:
        """One pass over this worker's share of the epoch. Returns the sums over all ranks:
        [rows, loss sum, top-1 correct, top-5 correct, data wait s, elapsed s, skipped], or None
        when the run diverged (`max_nonfinite_steps` skipped steps in a row)."""
        config, loop, device = self.config, self.loop, self.device
        # From the checkpoint's position on (0, or a mid-epoch checkpoint's step): nothing before
        # it is read or decoded, and the remaining steps are split over today's workers.
        stream = SplitStream(self.manifest, "train", config.data, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, batch_size=config.micro_batch,
                             device=device, training=True, global_batch=config.global_batch,
                             max_workers=config.workers, start_step=loop.batch_in_epoch,
                             boxes=self.boxes)  # fmt: skip
        self.model.train()
        resumed = loop.batch_in_epoch > 0
        # A mid-epoch checkpoint carries the epoch's sums so far over all ranks (rank 0 takes
        # them back), so the epoch's metrics after a restart count every batch exactly once.
        sums = loop.epoch_sums if resumed and self.rank == 0 else None
        seen, loss_sum, c1, c5, wait, before = sums or (0.0, 0.0, 0, 0, 0.0, 0.0)
        correct = torch.tensor([int(c1), int(c5)], dtype=torch.long, device=device)
        if not resumed:
            loop.nonfinite_steps = 0  # steps skipped this epoch: the same on every rank
        started = tick = time.perf_counter() - before

        def sums_so_far() -> list[float]:  # this rank's; a checkpoint holds them over all ranks
            return [seen, loss_sum, *correct.tolist(), wait, time.perf_counter() - started]

        for index, batches in enumerate(stream.steps(), start=stream.start_step):
            trace(self.trace, "trained", [f"{epoch} {index} {key}" for *_, keys in batches
                                          for key in keys])  # fmt: skip
            micro_batches = [(x.contiguous(memory_format=torch.channels_last), y)
                             if self.channels_last else (x, y) for x, y, _ in batches]  # fmt: skip
            wait += time.perf_counter() - tick
            first, last = stream.order.step_span(index)
            step = train_step(self.model, self.optimizer, micro_batches, bf16=self.bf16,
                              clip_grad_norm=config.clip_grad_norm,
                              global_rows=last - first, objective=self.objective)  # fmt: skip
            loop.step += 1
            loop.batch_in_epoch += 1
            if step.applied:
                rows = sum(len(y) for _, y in micro_batches)
                seen, loss_sum = seen + rows, loss_sum + step.loss * rows
                correct += step.correct
                loop.nonfinite_streak = 0
            else:  # skipped: not counted in the epoch's loss and accuracy
                loop.nonfinite_steps += 1
                loop.nonfinite_streak = streak = loop.nonfinite_streak + 1
                if streak >= config.max_nonfinite_steps:
                    self._stop_diverged(epoch, streak, sums_so_far())
                    return None
            if loop.step % config.log_every_steps == 0:
                self.tracker.log_metrics({"train_loss_step": step.loss, "grad_norm": step.grad_norm,
                                          "lr": self.optimizer.param_groups[0]["lr"]},
                                         step=loop.step)  # fmt: skip
            every = config.checkpoint_every_steps
            notice = self._preemption_notice(loop.step)
            if notice or (every and loop.step % every == 0):
                loop.epoch_sums = self._sum_over_ranks(sums_so_far())
                self.report({"epoch": epoch, "step": loop.step}, is_epoch_end=False,
                            suffix="-preempted" if notice else "")  # fmt: skip
            tick = time.perf_counter()
        return self._sum_over_ranks([*sums_so_far(), stream.skipped])

    def _preemption_notice(self, step: int) -> bool:
        """Whether a node of this run is being reclaimed: Ray reports it (a drain for
        preemption, as a cloud autoscaler does on a spot warning), or a rank got a SIGTERM (a
        spot node's shutdown, where Ray reports nothing: that rank then asks Ray to drain its
        node, so the two are one event to Ray). Every rank then stops at this step boundary
        and the run checkpoints at once, before the deadline, and trains on; when the node goes
        or the deadline passes, Ray Train restarts the run from that checkpoint on what remains
        (an elastic run) or returns, counted against `max_preemptions`. True once per attempt
        (Ray restarts an attempt once, however many nodes its notices name); every rank gets
        the same answer (the calls are collectives)."""
        import ray.train

        if step % PREEMPTION_POLL_STEPS:
            return False
        notice = ray.train.get_preemption_info()
        # Any rank's SIGTERM: one tiny all-reduce beside Ray's broadcast, every 10 steps.
        terminating = self._sum_over_ranks([float(SIGTERM_RECEIVED.is_set())])[0] > 0
        if self.preempted or not (notice or terminating):
            return False
        self.preempted = True
        if SIGTERM_RECEIVED.is_set():
            drained = drain_own_node(self.config.sigterm_notice_s)
            log.warning("rank %d got a SIGTERM: %s; checkpointing at step %d", self.rank,
                        f"its node drains for preemption in {self.config.sigterm_notice_s:g} s"
                        if drained else "its node stays (the head node, or Ray refused the "
                        "drain): the run checkpoints and goes on",
                        step)  # fmt: skip
        if notice and self.rank == 0:
            nodes = ", ".join(node[:8] for node in notice.preempted_node_to_ranks)
            log.warning("preemption notice for node(s) %s: checkpointing at step %d", nodes, step)
        return True

    def _stop_diverged(self, epoch: int, streak: int, partial: list[float]) -> None:
        """Checkpoint the weights from before the streak of skipped steps (none of them changed
        the weights) and report the run as diverged. The streak's batches are handed back to the
        epoch, so a run continued with a lower lr trains on them."""
        loop = self.loop
        back = min(streak, loop.batch_in_epoch)  # a streak may have begun last epoch
        loop.step -= back
        loop.batch_in_epoch -= back
        loop.nonfinite_steps -= back
        loop.nonfinite_streak = 0
        loop.epoch_sums = self._sum_over_ranks(partial)
        if self.rank == 0:
            log.error("epoch %d: %d steps in a row had a non-finite gradient; stopping the run",
                      epoch + 1, streak)  # fmt: skip
        self.report({"epoch": epoch, "step": loop.step, "diverged": float(streak)},
                    is_epoch_end=False, suffix="-diverged")  # fmt: skip

    def validate(self) -> list[float]:
        """[rows, the objective's two counts, loss sum] over the whole val split, all ranks."""
        self.model.eval()
        val = SplitStream(self.manifest, "val", self.config.data, epoch=0, rank=self.rank,
                          world_size=self.world_size, batch_size=self.config.micro_batch,
                          device=self.device, training=False, boxes=self.boxes)  # fmt: skip
        counts = evaluate_counts(self.model, val, bf16=self.bf16, objective=self.objective)
        counts = counts.to(self.device)
        return all_reduce(counts).tolist()

    def _metrics(self, epoch: int, train: list[float], val: list[float]) -> dict[str, float]:
        rows, loss_sum, c1, c5, wait, elapsed, skipped = train
        rows, val_rows = max(rows, 1.0), max(val[0], 1.0)
        errors = self.objective.errors
        return {
            "epoch": epoch,
            "step": self.loop.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / rows,
            **{f"train_{k}": v for k, v in errors((c1, c5), rows).items()},
            "val_loss": val[3] / val_rows,
            **{f"val_{k}": v for k, v in errors(val[1:3], val_rows).items()},
            # elapsed is summed over ranks: their mean is the epoch's wall time
            "images_per_s": rows / max(elapsed / self.world_size, 1e-9),
            "data_wait_share": wait / max(elapsed, 1e-9),
            "skipped_records": skipped,
            "nonfinite_steps": self.loop.nonfinite_steps,
        }

    def report(self, metrics: dict[str, float], *, is_epoch_end: bool, suffix: str = "") -> None:
        """Every rank calls this equally often (it is a collective); rank 0 writes the state."""
        import ray.train

        name = f"epoch-{self.loop.epoch:04d}-step-{self.loop.step:08d}{suffix}"
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                ckpt.save_state(directory, self._state())
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            score, tie_break = self.objective.score, self.objective.tie_break
            rank = metrics[score] + TIE_BREAK * metrics[tie_break] if is_epoch_end else 2.0
            ray.train.report(
                # Mid-epoch checkpoints are not evaluated: ranked below any epoch's (Ray's
                # ranking cannot take inf), they are kept only while they are the latest.
                {**metrics, score: metrics[score] if is_epoch_end else 1.0, RANK: rank},
                checkpoint=checkpoint,
                checkpoint_dir_name=name,
            )

    def _state(self) -> dict[str, Any]:
        """A checkpoint: what a resume needs, and what later jobs need to use the net."""
        config = self.config
        return {
            "arch": config.arch, "width": config.width, "classes": list(self.manifest.wnids),
            "config": config.to_dict(), "data_stats": dataclasses.asdict(self.manifest.stats),
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "rng": ckpt.rng_state(),
            "loop": dataclasses.asdict(self.loop),
            # metric values rank 0 could not send yet, and those a full queue dropped (counted)
            "unsent_metrics": self.tracker.unsent(), "dropped_metrics": self.tracker.dropped,
        }  # fmt: skip

    def _load(self, model: VGG, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.loop = LoopState.from_dict(state["loop"])
        # The config wins over the optimizer state restored: a PBT trial continues another
        # trial's checkpoint with its own (perturbed) weight decay and base lr.
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.config.weight_decay

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return all_reduce(tensor).tolist()


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker."""
    # Each epoch builds its own datasets; their INFO lines (execution plans, every report) would
    # bury the one progress line per epoch.
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    Worker(loop_config).train()
