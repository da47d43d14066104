"""A localisation net (Appendix A) with the classifier that rates its boxes, as an MLflow pyfunc
"model from code": what `vgg-ray register --run <localisation run> --classifier <net>` logs
and registers (see `vgg_ray.ensemble_model` for why the code is the installed package's).

`load_context` rebuilds the localisation net(s) and the classifier from their state files
(`torch.load(weights_only=True)`) and their `NetInfo`s from the model config. Predictions are
protocol 2 of `vgg-ray localise` (`localisation.Localiser.top5`): the classifier's top-5
classes, each with its posterior and the merged box of the dense localisation net(s), so the
served boxes are the evaluated ones.

Input: raw RGB images of any size, as `ensemble_model.as_images` takes them (uint8 arrays,
encoded bytes, or a DataFrame with an `image` column). Params: `scales` (test scales Q, []: each
net's training scale). Output: a DataFrame, 5 rows per image (fewer with fewer classes): image
(its index in the input), rank (1 = best), class (index), wnid, score (posterior), xmin, ymin,
xmax, ymax (pixels of the input image, continuous: a box over the whole w x h image is
0, 0, w, h).
"""

from __future__ import annotations

from typing import Any

import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class LocaliserModel(PythonModel):
    """Top-5 (class, score, box) per image: `vgg-ray localise`'s protocol 2."""

    def load_context(self, context) -> None:
        from vgg_ray.checkpoint import load_state, model_from_state
        from vgg_ray.ensemble_model import info_from_dict
        from vgg_ray.evaluate_job import LoadedNet
        from vgg_ray.localisation import scorers

        config = context.model_config
        self.default_scales: list[int] = list(config.get("scales") or [])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        nets = []
        for member in [*config["members"], config["classifier"]]:
            state = load_state(context.artifacts[member["artifact"]])
            nets.append(LoadedNet(model_from_state(state).eval(), info_from_dict(member["info"])))
        self.classes: list[str] = list(state["classes"])  # the classifier's, by output index
        # fp32 even on GPU: boxes equal the evaluated ones on CPU.
        self.localiser = scorers(nets[:-1], nets[-1], device, bf16=False)
        self.infos = [net.info for net in nets[:-1]]

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from vgg_ray.ensemble_model import as_images
        from vgg_ray.evaluate import single_scale

        scales = tuple(int(q) for q in ((params or {}).get("scales") or self.default_scales))
        per_net = tuple(scales or (single_scale(info),) for info in self.infos)
        rows = []
        for index, image in enumerate(as_images(model_input)):
            guesses = self.localiser.top5(image, tuple(range(len(self.infos))), per_net)
            for rank, (c, score, box) in enumerate(guesses, start=1):
                xmin, ymin, xmax, ymax = (float(v) for v in box)
                rows.append({"image": index, "rank": rank, "class": c, "wnid": self.classes[c],
                             "score": score, "xmin": xmin, "ymin": ymin, "xmax": xmax,
                             "ymax": ymax})  # fmt: skip
        return pd.DataFrame(rows, columns=["image", "rank", "class", "wnid", "score", "xmin",
                                           "ymin", "xmax", "ymax"])  # fmt: skip


set_model(LocaliserModel())
