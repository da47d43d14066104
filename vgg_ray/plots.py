"""The training curves as one PNG: loss, error (top-1/top-5, or a localisation net's
localisation error) and learning rate per epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: list[dict[str, float]], path: str | Path) -> str:
    """Draw `history` (one dict of metrics per epoch) to `path`; returns the path."""
    epochs = [h["epoch"] + 1 for h in history]
    figure, (loss, error, lr) = plt.subplots(1, 3, figsize=(14, 4))
    loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    loss.set(title="loss", xlabel="epoch")
    for key, style in (("top1", "-"), ("top5", "--"), ("loc", "-")):
        for split in ("train", "val"):
            if history and f"{split}_{key}_error" in history[0]:
                values = [100 * h[f"{split}_{key}_error"] for h in history]
                error.plot(epochs, values, style, label=f"{split} {key}")
    error.set(title="error (%)", xlabel="epoch")
    lr.semilogy(epochs, [h["lr"] for h in history])
    lr.set(title="learning rate", xlabel="epoch")
    for axes in (loss, error):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)
