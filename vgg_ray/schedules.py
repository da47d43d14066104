"""Learning-rate schedule families: the paper's plateau rule (Sect. 3.1) and the usual others.

A schedule gives the multiplier on the run's base learning rate (`TrainConfig.lr`) for an epoch;
the train loop sets `lr * multiplier(epoch)` at the start of each epoch and calls `update` with
the epoch's validation accuracy at its end. Keeping the base lr outside the schedule's state is
what lets a PBT trial continue from another trial's checkpoint with a new lr: the schedule's
position (epoch, decays so far) comes from the checkpoint, the base lr from the new config.
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("plateau", "step", "cosine", "warmup_cosine")


def step_decay(epoch: int, *, factor: float, step_size: int) -> float:
    """Multiply by `factor` every `step_size` epochs (torch's StepLR)."""
    return factor ** (epoch // step_size)


def cosine(epoch: int, *, epochs: int) -> float:
    """Half a cosine from 1 at epoch 0 towards 0 at `epochs` (SGDR without restarts)."""
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def warmup_cosine(epoch: int, *, epochs: int, warmup: int) -> float:
    """Linear warm-up over `warmup` epochs (1/warmup, 2/warmup, ..., 1; Goyal et al. 2017),
    then a cosine over the remaining epochs."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    return cosine(epoch - warmup, epochs=max(epochs - warmup, 1))


class Plateau:
    """The paper's rule: divide by 1/factor when validation accuracy has not improved for more
    than `patience` epochs, at most `max_decays` times. Same decisions as torch's
    ReduceLROnPlateau(mode="max", threshold=1e-4) with a min_lr after `max_decays` decays,
    except that no epoch counts as a plateau while the best accuracy is still at chance
    (below `started`): a net that has not begun to learn needs its lr, not a tenth of it."""

    THRESHOLD = 1e-4  # relative improvement that counts, as torch's default

    def __init__(self, *, factor: float, patience: int, max_decays: int, started: float = 0.0):
        self.factor, self.patience, self.max_decays = factor, patience, max_decays
        self.started = started
        self.best = -math.inf
        self.bad_epochs = 0
        self.decays = 0

    def multiplier(self, epoch: int) -> float:
        return self.factor**self.decays

    def update(self, val_accuracy: float) -> None:
        if val_accuracy > self.best * (1 + self.THRESHOLD):
            self.best, self.bad_epochs = val_accuracy, 0
        elif self.best >= self.started:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.decays = min(self.decays + 1, self.max_decays)
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "decays": self.decays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_bad_epochs" in state:  # a checkpoint written with torch's ReduceLROnPlateau
            # its min_lr was lr * factor**max_decays: the current lr tells the decays so far
            below_min = math.log(state["_last_lr"][0] / state["min_lrs"][0]) / math.log(self.factor)
            state = {"best": state["best"], "bad_epochs": state["num_bad_epochs"],
                     "decays": self.max_decays + round(below_min)}  # fmt: skip
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.decays = int(state["decays"])


class EpochSchedule:
    """A stateless family: the multiplier is a function of the epoch alone."""

    def __init__(self, name: str, *, epochs: int, factor: float, step_size: int, warmup: int):
        self.name = name
        self.epochs, self.factor, self.step_size, self.warmup = epochs, factor, step_size, warmup

    def multiplier(self, epoch: int) -> float:
        if self.name == "step":
            return step_decay(epoch, factor=self.factor, step_size=self.step_size)
        if self.name == "cosine":
            return cosine(epoch, epochs=self.epochs)
        return warmup_cosine(epoch, epochs=self.epochs, warmup=self.warmup)

    def update(self, val_accuracy: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_schedule(
    name: str, *, epochs: int, factor: float, patience: int, max_decays: int, step_size: int,
    warmup: int, classes: int = 0,
) -> Plateau | EpochSchedule:  # fmt: skip
    """The schedule `name` (one of SCHEDULES) with the run's settings. With `classes`, the
    plateau rule waits until val accuracy exceeds 1.5x chance (1.5 / classes) before decaying."""
    if name == "plateau":
        started = 1.5 / classes if classes else 0.0
        return Plateau(factor=factor, patience=patience, max_decays=max_decays, started=started)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return EpochSchedule(name, epochs=epochs, factor=factor, step_size=step_size, warmup=warmup)
