"""An ensemble of vgg-ray nets as an MLflow pyfunc "model from code" (Table 6: the D+E fusion).

`vgg_ray.registry.register_ensemble` logs this file with `mlflow.pyfunc.log_model(python_model=
<this file>, artifacts={"member_0": <dir with state.pt>, ...}, model_config={...})`. MLflow runs
the file when it loads the model; `set_model` at the bottom hands it the instance, and
`load_context` rebuilds each member from its state file (`torch.load(weights_only=True)`, no
pickled code) and its `NetInfo` from the model config.

Predictions are the evaluation protocol itself: `vgg_ray.evaluate.Evaluator` with the one row
`protocols(infos, (mode,), scales, members=False)` that `vgg-ray evaluate --no-members` computes
for the same nets, so the served soft-max is the evaluated one. The protocol code is imported
from the installed `vgg_ray` package (a pinned pip requirement), not copied into the model with
`code_paths`: MLflow only prepends code_paths to sys.path, so in any process that has already
imported vgg_ray (the evaluation and promotion jobs, tests) the copy would silently lose to the
installed package, and served and evaluated code could differ without anyone seeing it.

Input: raw RGB images of any size, since every mode rescales the image to its test scales Q:
- a uint8 array (N, H, W, 3), or a list of uint8 (H, W, 3) arrays (sizes may differ), or
- a list of encoded image bytes (JPEG, PNG), or a pandas DataFrame with an `image` column of
  either (what a serving endpoint receives).
Params: `mode` (single | dense | multicrop | dense+multicrop; default from the model config),
`scales` (test scales Q applied to every member; [] = the paper's per net), `output`
("probs": float32 (N, classes) averaged soft-max; "top5": int64 (N, 5) class indices, best
first). Class ids (WordNet ids) by index are in the model's metadata (`classes`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

OUTPUTS = ("probs", "top5")


def info_from_dict(values: dict[str, Any]):
    """A member's `NetInfo` from its JSON form in the model config."""
    from vgg_ray.evaluate import NetInfo
    from vgg_ray.transforms import ColorStats

    stats = values.get("stats")
    return NetInfo(
        name=values["name"],
        crop=int(values["crop"]),
        train_scale=tuple(int(s) for s in values["train_scale"]),
        normalize=values["normalize"],
        stats=ColorStats(
            mean_rgb=tuple(stats["mean_rgb"]),
            eigval=tuple(stats["eigval"]),
            eigvec=tuple(tuple(row) for row in stats["eigvec"]),
        )
        if stats
        else None,
        classes=tuple(values.get("classes", ())),
        source=values.get("source", ""),
        run_id=values.get("run_id"),
        manifest=values.get("manifest", ""),
        regression=values.get("regression", ""),
        finetune=values.get("finetune", "all"),
    )


def as_images(model_input: Any) -> list[torch.Tensor]:
    """uint8 (3, h, w) tensors, as the evaluation job's decoder yields them."""
    from torchvision.io import ImageReadMode, decode_image

    from vgg_ray.errors import ConfigError

    if hasattr(model_input, "columns"):  # a pandas DataFrame from a serving endpoint
        if "image" not in model_input.columns:
            raise ConfigError(f"a DataFrame input needs an 'image' column; got "
                              f"{list(model_input.columns)}")  # fmt: skip
        model_input = list(model_input["image"])
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        model_input = list(model_input)
    if not isinstance(model_input, list | tuple):
        raise ConfigError(
            "input must be images: a uint8 array (N, H, W, 3), a list of uint8 (H, W, 3) "
            f"arrays or of encoded image bytes; got {type(model_input).__name__}"
        )
    images = []
    for i, item in enumerate(model_input):
        if isinstance(item, bytes | bytearray):
            data = torch.frombuffer(bytearray(item), dtype=torch.uint8)
            images.append(decode_image(data, mode=ImageReadMode.RGB))
            continue
        array = np.asarray(item)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ConfigError(
                f"image {i}: expected raw RGB pixels, uint8 (H, W, 3); got {array.dtype} "
                f"{array.shape} (normalisation and rescaling are the model's job)"
            )
        images.append(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))
    return images


class EnsembleModel(PythonModel):
    """The members' soft-max averaged under one evaluation protocol (see the module docstring)."""

    def load_context(self, context) -> None:
        from vgg_ray.checkpoint import load_state, model_from_state

        config = context.model_config
        self.default_mode: str = config["mode"]
        self.default_scales: list[int] = list(config.get("scales") or [])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models, self.infos = [], []
        for member in config["members"]:
            state = load_state(context.artifacts[member["artifact"]])
            self.models.append(model_from_state(state).eval())
            self.infos.append(info_from_dict(member["info"]))
        # WordNet ids by output index (the same for every member: checked at registration).
        self.classes: list[str] = list(state["classes"])
        self._evaluators: dict[tuple, Any] = {}  # (mode, scales) -> Evaluator, built once

    def evaluator(self, mode: str, scales: tuple[int, ...]):
        """The protocol's Evaluator: the same row `vgg-ray evaluate --no-members` computes."""
        from vgg_ray.evaluate import Evaluator, protocols

        key = (mode, scales)
        if key not in self._evaluators:
            # The last row: with default scales, dense has two (Table 3's one Q, Table 4's three);
            # the three-scale one is what the ensemble predicts with (Table 6).
            rows = protocols(self.infos, (mode,), [scales] if scales else (), members=False)[-1:]
            # fp32 even on GPU: predictions equal the evaluated ones bit for bit on CPU.
            self._evaluators[key] = Evaluator(self.models, self.infos, rows, device=self.device)
        return self._evaluators[key]

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        from vgg_ray.errors import ConfigError

        params = params or {}
        mode = params.get("mode") or self.default_mode
        scales = tuple(int(q) for q in (params.get("scales") or self.default_scales))
        output = params.get("output") or "probs"
        if output not in OUTPUTS:
            raise ConfigError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
        probs = self.evaluator(mode, scales).posteriors(as_images(model_input))[0].cpu()
        if output == "top5":
            return probs.topk(min(5, probs.shape[-1]), dim=-1).indices.numpy()
        return probs.numpy()


set_model(EnsembleModel())
