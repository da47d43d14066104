"""The paper's image recipe (Sect. 3.1 and 3.2): one keyword-only preset per split.

Training: isotropic rescale so the smaller side is S (fixed, or "scale jittering": S uniform in
[Smin, Smax] per image), a random crop, a random horizontal flip, AlexNet's PCA colour shift, and
the mean RGB subtracted. Evaluation: rescale to Q, then a centre crop, or the whole image for
dense evaluation.

Every op works on uint8 CHW tensors, on CPU (decoded in Ray Data tasks) and on CUDA (decoded with
nvjpeg on the training GPU), so both paths share this code. A preset works in two stages:

- `prepare` (uint8 -> uint8): the geometry. In training, the crop window of the S-rescaled image
  is mapped back to source pixels (rounded to whole pixels: within one source pixel of the
  literal recipe) and only that window is resized, straight to crop x crop, so the resize writes
  crop^2 pixels instead of the whole rescaled image (S = 512 on a 500x375 photo: 682x512).
  It returns the pixels plus a per-image, per-channel gain and bias.
- `prepare_jpegs` (JPEG bytes -> uint8, the CPU path): `prepare` of the decoded images, but in
  training each record decodes only its crop window where `_vgg_ray_jpeg` is built
  (libjpeg-turbo's region decode: the rows below the window are never read, the IDCT and colour
  conversion run only inside it; a window of at least 4x the crop is decoded at 1/2, 1/4 or 1/8
  by the IDCT itself); the window's pixels are the whole decode's, so the crops are the same (within
  interpolation tolerance where the decoder shrank them).
- `to_float`: colour shift, mean subtraction and scaling are one affine map per channel and
  image, applied after the crop, in place on the one float tensor. The Ray tasks ship the 4x smaller
  uint8 crops; the training worker finishes them on its device.

Randomness is explicit: an image's draws come from a generator seeded by (seed, epoch, row
index), so a run is a function of its seed and a row gets the same augmentation whichever worker,
task or device handles it.

This module imports neither ray, pyarrow nor mlflow: it runs alone on a GPU benchmark machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from vgg_ray.errors import ConfigError

try:  # the region-of-interest JPEG decoder (vgg_ray/_jpeg.c), built by `pip install` where
    # libjpeg's headers are. A top-level module: a job's working-dir copy of this package (which
    # Ray uploads without built files) still finds the one installed.
    import _vgg_ray_jpeg as _jpeg
except ImportError:  # not built: whole-image decodes with torchvision, the same crops, slower
    _jpeg = None

NORMALIZATIONS = ("paper", "torchvision")
# The paper's training scale range (S jittered in [256, 512], Sect. 3.1) and crop: the defaults
# of every preset and config, written here once.
PAPER_SCALE = (256, 512)
PAPER_CROP = 224
# torchvision's ImageNet normalisation, for nets initialised from torchvision weights (0..1 scale).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class ColorStats:
    """RGB statistics of the training set, on the 0..255 scale (the manifest's `stats`)."""

    mean_rgb: tuple[float, float, float] = (123.68, 116.78, 103.94)
    """The mean subtracted from every pixel (Sect. 2.1). Default: the ImageNet mean of Caffe's
    VGG release."""
    eigval: tuple[float, float, float] = (14142.9, 1222.5, 292.6)
    """Eigenvalues lambda_i of the RGB covariance of 0..255 pixels (units: pixel value^2), as
    `vgg_ray.prepare` computes them. Default: fb.resnet.torch's ImageNet values (0.2175,
    0.0188, 0.0045 on the 0..1 scale) times 255^2."""
    eigvec: tuple[tuple[float, float, float], ...] = (
        (-0.5675, 0.7192, 0.4009),
        (-0.5808, -0.0045, -0.8140),
        (-0.5836, -0.6948, 0.4203),
    )
    """3x3; column i (`eigvec[:][i]`) is the eigenvector p_i paired with `eigval[i]`."""


class Prepared(NamedTuple):
    """A batch after the geometric stage: `to_float` maps it to the net's input."""

    pixels: torch.Tensor | list[torch.Tensor]
    """uint8 (N, 3, crop, crop); a list of (3, h, w) in the evaluation `whole` mode."""
    gain: torch.Tensor
    """float32 (N, 3): per-image, per-channel multiplier."""
    bias: torch.Tensor
    """float32 (N, 3): per-image, per-channel offset (colour shift and mean, normalised)."""
    windows: tuple[Window, ...] = ()
    """Each image's crop as a window of the decoded image (training: its rescale, random
    position and flip; evaluation: its centre crop): how its boxes move (Appendix A)."""


class Draws(NamedTuple):
    """One training batch's random draws, one entry per image."""

    scale: np.ndarray  # int64 (N,): S, the rescaled image's smaller side
    top: np.ndarray  # float64 (N,) in [0, 1): crop position, as a fraction of the free rows
    left: np.ndarray  # float64 (N,) in [0, 1): ... and of the free columns
    flip: np.ndarray  # bool (N,)
    alpha: np.ndarray  # float64 (N, 3): the colour shift's alpha_i ~ N(0, color_shift_std)


class Window(NamedTuple):
    """The source pixels one crop shows: [top, top + height) x [left, left + width) of the
    decoded image, resized to crop x crop, then mirrored if `flip`. What moves a box
    (`vgg_ray.boxes.into_window`) exactly as the pixels move."""

    top: float
    left: float
    height: float
    width: float
    flip: bool = False


def decode_cpu(data: Sequence[bytes]) -> list[torch.Tensor | None]:
    """Decode JPEG bytes to uint8 RGB (3, h, w) CPU tensors; None where a record is not a JPEG."""
    images: list[torch.Tensor | None] = []
    for record in data:
        try:
            # bytearray: torch.frombuffer warns on read-only buffers; the copy costs ~1% of decode.
            raw = torch.frombuffer(bytearray(record), dtype=torch.uint8)
            images.append(decode_jpeg(raw, mode=ImageReadMode.RGB))
        except (RuntimeError, ValueError):
            images.append(None)
    return images


def decode_gpu(data: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode JPEG bytes with nvjpeg on `device` to uint8 RGB (3, h, w) CUDA tensors in one
    batched call; None where a record is not a JPEG."""
    raws: list[torch.Tensor | None] = []
    for record in data:
        raw = torch.frombuffer(bytearray(record), dtype=torch.uint8) if record else None
        # nvjpeg fails the whole batch on one bad record: catch the obvious ones (no SOI marker)
        # here, and fall back to one-by-one decoding below for the rest.
        raws.append(raw if raw is not None and raw.numel() > 2 and record[:2] == b"\xff\xd8"
                    else None)  # fmt: skip
    good = [i for i, raw in enumerate(raws) if raw is not None]
    images: list[torch.Tensor | None] = [None] * len(raws)
    try:
        decoded = decode_jpeg([raws[i] for i in good], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(good, decoded, strict=True):
            images[i] = image
    except RuntimeError:
        for i in good:
            try:
                images[i] = decode_jpeg(raws[i], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                images[i] = None
    return images


def decode_window(
    record: bytes, window: tuple[int, int, int, int], shrink: int = 1
) -> torch.Tensor:
    """The (top, left, height, width) window of a JPEG decoded at 1/`shrink` (1, 2, 4 or 8,
    inside the decoder; the window in those pixels), uint8 RGB (3, height, width) (a
    channels-last view), decoding no more of the image than it needs: exactly the pixels of the
    whole decode at that scale. Raises ValueError where the record is not a JPEG libjpeg can
    give as RGB (CMYK, say), and where `_vgg_ray_jpeg` is not built."""
    if _jpeg is None:
        raise ValueError("the window decoder (_vgg_ray_jpeg) is not built")
    top, left, height, width = window
    pixels = _jpeg.decode_window(record, top, left, height, width, shrink)
    return torch.frombuffer(pixels, dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


def _shrunk_window(
    size: tuple[int, int], window: tuple[int, int, int, int], crop: int
) -> tuple[int, tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(shrink, the window in the 1/shrink image's pixels, the source pixels those show) for a
    (top, left, height, width) window of an image of `size`. The shrink is the largest of 8, 4,
    2 that leaves the window at least twice the crop: the antialiased resize after it still does
    half the downscale or more, which keeps the crop within a grey level (mean) of a resize of
    the whole decode. Shrunk pixels are whole source blocks, so the window moves by under
    shrink / 2 source pixels; the source window returned is the one shown, for the boxes."""
    (height, width), (y, x, h, w) = size, window
    shrink = next((d for d in (8, 4, 2) if min(h, w) >= 2 * d * crop), 1)
    if shrink == 1:
        return 1, window, window
    # libjpeg's 1/d image is ceil(H/d) x ceil(W/d); its pixel j shows source [j d, (j + 1) d).
    out_h, out_w = -(-height // shrink), -(-width // shrink)
    y0, x0 = round(y / shrink), round(x / shrink)
    y1, x1 = min(round((y + h) / shrink), out_h), min(round((x + w) / shrink), out_w)
    source = (y0 * shrink, x0 * shrink, min(y1 * shrink, height) - y0 * shrink,
              min(x1 * shrink, width) - x0 * shrink)  # fmt: skip
    return shrink, (y0, x0, y1 - y0, x1 - x0), source


def jpeg_size(record: bytes) -> tuple[int, int]:
    """A JPEG's (height, width) from its header alone (a microsecond). Raises ValueError where
    the record has no readable JPEG header, and where `_vgg_ray_jpeg` is not built."""
    if _jpeg is None:
        raise ValueError("the window decoder (_vgg_ray_jpeg) is not built")
    return _jpeg.size(record)


def rescaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) after an isotropic rescale to smaller side `short_side`; torchvision's rounding."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def source_window(
    height: int, width: int, *, short_side: int, crop: int, top: int, left: int
) -> tuple[int, int, int, int]:
    """The source pixels (top, left, h, w) under the `crop` x `crop` window at (top, left) of the
    image rescaled to smaller side `short_side`; rounded to whole source pixels (< 1 px)."""
    rescaled_h, _ = rescaled_size(height, width, short_side)
    ratio = height / rescaled_h  # source pixels per rescaled pixel, the same on both axes
    size_h = min(height, max(1, round(crop * ratio)))
    size_w = min(width, max(1, round(crop * ratio)))
    y = min(round(top * ratio), height - size_h)
    x = min(round(left * ratio), width - size_w)
    return y, x, size_h, size_w


def _resized_window(image: torch.Tensor, window: tuple[int, int, int, int], crop: int):
    y, x, h, w = window
    return F.resized_crop(image, y, x, h, w, [crop, crop], antialias=True)


def _affine(
    shift: torch.Tensor, stats: ColorStats, normalize: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image gain and bias so that out = pixel * gain + bias, from colour shifts (N, 3)."""
    mean = torch.tensor(stats.mean_rgb, dtype=torch.float32)
    if normalize == "paper":  # 0..255 pixels minus the mean RGB (Sect. 2.1)
        return torch.ones_like(shift), shift - mean
    tv_mean = torch.tensor(TORCHVISION_MEAN)
    tv_std = torch.tensor(TORCHVISION_STD)
    # ((x + shift) / 255 - m) / s = x / (255 s) + (shift / 255 - m) / s
    gain = (1.0 / (255.0 * tv_std)).expand_as(shift).clone()
    return gain, (shift / 255.0 - tv_mean) / tv_std


def normalization(stats: ColorStats, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (3,) gain and bias of the test-time input (no colour shift): net input =
    uint8 pixel * gain + bias per channel, as `EvalPreset` computes it."""
    _check_common(None, normalize)
    gain, bias = _affine(torch.zeros(1, 3), stats, normalize)
    return gain[0], bias[0]


def to_float(prepared: Prepared, dtype: torch.dtype = torch.float32):
    """The net's input from a prepared batch: pixel * gain + bias per channel (computed in float32,
    then cast: bf16 on the GPU if asked). A tensor (N, 3, crop, crop), or a list in `whole`
    mode."""
    pixels, gain, bias = prepared.pixels, prepared.gain, prepared.bias
    if isinstance(pixels, list):
        return [
            p.float()
            .mul_(g.to(p.device)[:, None, None])
            .add_(b.to(p.device)[:, None, None])
            .to(dtype)
            for p, g, b in zip(pixels, gain, bias, strict=True)
        ]
    gain = gain.to(pixels.device, non_blocking=True)[:, :, None, None]
    bias = bias.to(pixels.device, non_blocking=True)[:, :, None, None]
    # In place on the one new float tensor: 2-4x faster on CPU than an out-of-place addcmul.
    return pixels.float().mul_(gain).add_(bias).to(dtype)


def _check_common(crop: int | None, normalize: str, color_shift_std: float = 0.0) -> None:
    if crop is not None and crop < 1:
        raise ConfigError(f"crop must be >= 1, got {crop}")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}"
        )
    if not color_shift_std >= 0:
        raise ConfigError(f"color_shift_std must be >= 0, got {color_shift_std}")


@dataclass(frozen=True, kw_only=True)
class TrainingPreset:
    """Sect. 3.1's training augmentation. Call it, or `prepare` then `to_float`."""

    scale: tuple[int, int] = PAPER_SCALE
    """(Smin, Smax): S is drawn per image uniformly from the integers in [Smin, Smax]; Smin =
    Smax is the paper's fixed-scale training (S = 256 or 384)."""
    crop: int = PAPER_CROP
    """Side of the square random crop (224 in the paper; e.g. 32 in tests and the demo)."""
    color_shift_std: float = 0.1
    """Std of alpha_i in AlexNet's PCA colour shift; 0 turns it off."""
    normalize: str = "paper"
    """"paper": 0..255 pixels minus the mean RGB; "torchvision": (x / 255 - mean) / std with
    ImageNet's mean and std, for nets initialised from torchvision weights."""
    stats: ColorStats = field(default_factory=ColorStats)
    """Mean RGB and RGB covariance eigen-decomposition of the training set."""
    seed: int = 0
    """Root of every random draw: with the epoch and row index it fixes an image's augmentation."""

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 1 <= low <= high:
            raise ConfigError(f"scale must be (Smin, Smax), 1 <= Smin <= Smax; got {self.scale}")
        if self.crop > low:
            raise ConfigError(f"crop {self.crop} is larger than the smallest scale Smin = {low}")
        _check_common(self.crop, self.normalize, self.color_shift_std)

    def draw(self, indices: Sequence[int], *, epoch: int) -> Draws:
        """Each image's random draws, from a generator seeded by (seed, epoch, row index)."""
        n = len(indices)
        scale, top, left = np.empty(n, np.int64), np.empty(n), np.empty(n)
        flip, alpha = np.empty(n, bool), np.empty((n, 3))
        for i, index in enumerate(indices):
            rng = np.random.default_rng((self.seed, epoch, int(index)))
            scale[i] = rng.integers(self.scale[0], self.scale[1] + 1)
            top[i], left[i] = rng.random(2)
            flip[i] = rng.random() < 0.5
            alpha[i] = rng.normal(0.0, 1.0, 3) * self.color_shift_std
        return Draws(scale, top, left, flip, alpha)

    def color_shift(self, alpha: np.ndarray) -> torch.Tensor:
        """AlexNet's shift per image, sum_i alpha_i * lambda_i * p_i, (N, 3) on the 0..255 scale.

        The formula is AlexNet's on 0..1 pixels (lambda_i of the 0..1 covariance), as in
        fb.resnet.torch: in 0..255 units that is sum_i alpha_i * (lambda_i / 255) * p_i with our
        0..255 eigenvalues. With ImageNet's statistics the main shift then has a std of about
        5.5 pixel values along p_1 (lambda_1 / 255 = 55.5)."""
        eigval = torch.tensor(self.stats.eigval, dtype=torch.float64) / 255.0
        eigvec = torch.tensor(self.stats.eigvec, dtype=torch.float64)  # column i is p_i
        return (torch.from_numpy(alpha) * eigval @ eigvec.T).float()

    def _window(self, size: tuple[int, int], draws: Draws, i: int) -> Window:
        """Image i's crop (rescale, crop position, flip) from its (h, w) and the batch's draws."""
        height, width = size
        short_side = int(draws.scale[i])
        rescaled_h, rescaled_w = rescaled_size(height, width, short_side)
        # A uniform crop position among the (rescaled - crop + 1) possible ones per axis.
        top = math.floor(draws.top[i] * (rescaled_h - self.crop + 1))
        left = math.floor(draws.left[i] * (rescaled_w - self.crop + 1))
        window = source_window(height, width, short_side=short_side, crop=self.crop, top=top,
                               left=left)  # fmt: skip
        return Window(*window, flip=bool(draws.flip[i]))

    def _finish(self, crops: list[torch.Tensor], windows: list[Window], draws: Draws) -> Prepared:
        """The batch from its resized, not yet flipped crops and the draws of those images."""
        # Flip after the resize: it then touches crop^2 pixels, and it commutes with the resize.
        crops = [c.flip(-1) if w.flip else c for c, w in zip(crops, windows, strict=True)]
        pixels = torch.stack(crops) if crops else torch.empty(0, 3, self.crop, self.crop,
                                                               dtype=torch.uint8)  # fmt: skip
        gain, bias = _affine(self.color_shift(draws.alpha), self.stats, self.normalize)
        return Prepared(pixels, gain, bias, tuple(windows))

    def prepare(self, images: Sequence[torch.Tensor], *, epoch: int, indices: Sequence[int]):
        """Rescale, crop and flip uint8 (3, h, w) images (CPU or CUDA) -> `Prepared`, whose
        gain and bias carry this batch's colour shift and the normalisation."""
        if len(images) != len(indices):
            raise ValueError(f"{len(images)} images but {len(indices)} row indices")
        draws = self.draw(indices, epoch=epoch)
        windows = [self._window(tuple(im.shape[-2:]), draws, i) for i, im in enumerate(images)]
        crops = [_resized_window(image, window[:4], self.crop)
                 for image, window in zip(images, windows, strict=True)]  # fmt: skip
        return self._finish(crops, windows, draws)

    def prepare_jpegs(self, data: Sequence[bytes], *, epoch: int, indices: Sequence[int]):
        """`prepare` from JPEG bytes on the CPU -> (`Prepared`, the positions in `data` of the
        records that decoded). Each record decodes only its crop window (`decode_window`: the
        same pixels as a whole decode, so the same batch as `prepare(decode_cpu(data))`); a
        window of at least 4x the crop (a large photo) is decoded at 1/2, 1/4 or 1/8 inside the
        decoder, then resized: the crop of its (returned) window within interpolation tolerance,
        at a fraction of the work. torchvision decodes the whole image where the window decode
        cannot (not built, CMYK), and a record neither decodes is left out."""
        if len(data) != len(indices):
            raise ValueError(f"{len(data)} records but {len(indices)} row indices")
        draws = self.draw(indices, epoch=epoch)
        crops, windows, good = [], [], []
        for i, record in enumerate(data):
            try:
                size = jpeg_size(record)
                drawn = self._window(size, draws, i)
                shrink, shrunk, source = _shrunk_window(size, drawn[:4], self.crop)
                pixels = decode_window(record, shrunk, shrink)
                window = Window(*source, flip=drawn.flip)
                crop = F.resize(pixels, [self.crop, self.crop], antialias=True)
            except ValueError:
                image = decode_cpu([record])[0]
                if image is None:
                    continue
                window = self._window(tuple(image.shape[-2:]), draws, i)
                crop = _resized_window(image, window[:4], self.crop)
            crops.append(crop)
            windows.append(window)
            good.append(i)
        taken = Draws(*(column[good] for column in draws))
        return self._finish(crops, windows, taken), good

    def __call__(self, images, *, epoch: int, indices: Sequence[int], dtype=torch.float32):
        """uint8 (3, h, w) images -> the net's input, (N, 3, crop, crop) of `dtype`."""
        return to_float(self.prepare(images, epoch=epoch, indices=indices), dtype)


@dataclass(frozen=True, kw_only=True)
class EvalPreset:
    """Sect. 3.2's test-time rescale: to Q, then a centre crop, or the whole image."""

    scale: int = 256
    """Q, the test scale: the smaller side after the isotropic rescale."""
    crop: int | None = PAPER_CROP
    """Side of the centre crop; None keeps the whole rescaled image (dense evaluation), and
    `prepare` then returns a list of differently sized images."""
    normalize: str = "paper"
    """As `TrainingPreset.normalize`."""
    stats: ColorStats = field(default_factory=ColorStats)
    """Only the mean RGB is used (no colour shift at test time)."""

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ConfigError(f"eval scale Q must be >= 1, got {self.scale}")
        if self.crop is not None and self.crop > self.scale:
            raise ConfigError(f"crop {self.crop} is larger than the eval scale Q = {self.scale}")
        _check_common(self.crop, self.normalize)

    def _windows(self, sizes: Sequence[tuple[int, int]]) -> list[Window]:
        """Each image's centre crop of its Q-rescaled self, as a window of the decoded image
        (the whole image in `whole` mode)."""
        windows = []
        for height, width in sizes:
            if self.crop is None:
                windows.append(Window(0.0, 0.0, float(height), float(width)))
                continue
            rescaled_h, rescaled_w = rescaled_size(height, width, self.scale)
            # torchvision's center_crop offsets, in the rescaled image
            top = int(round((rescaled_h - self.crop) / 2.0))
            left = int(round((rescaled_w - self.crop) / 2.0))
            y, x = height / rescaled_h, width / rescaled_w  # source pixels per rescaled pixel
            windows.append(Window(top * y, left * x, self.crop * y, self.crop * x))
        return windows

    def prepare(self, images: Sequence[torch.Tensor], *, epoch: int = 0, indices=None):
        """Rescale to Q and centre-crop uint8 (3, h, w) images -> `Prepared` (no randomness:
        `epoch` and `indices` are accepted only to match `TrainingPreset.prepare`)."""
        n = len(images)
        gain, bias = _affine(torch.zeros(n, 3), self.stats, self.normalize)
        windows = tuple(self._windows([tuple(image.shape[-2:]) for image in images]))
        if self.crop is None:
            return Prepared([F.resize(i, [self.scale], antialias=True) for i in images], gain, bias,
                            windows)  # fmt: skip
        # The literal recipe here (whole-image rescale, then crop), not training's crop-first
        # shortcut: test-time numbers are compared with published ones; evaluation is cheap.
        crops = [
            F.center_crop(F.resize(image, [self.scale], antialias=True), [self.crop, self.crop])
            for image in images
        ]
        pixels = torch.stack(crops) if crops else torch.empty(0, 3, self.crop, self.crop,
                                                               dtype=torch.uint8)  # fmt: skip
        return Prepared(pixels, gain, bias, windows)

    def prepare_jpegs(self, data: Sequence[bytes], *, epoch: int = 0, indices=None):
        """`prepare` from JPEG bytes on the CPU -> (`Prepared`, the positions in `data` of the
        records that decoded): whole-image decodes, as the literal test-time recipe rescales
        the whole image."""
        images = decode_cpu(data)
        good = [i for i, image in enumerate(images) if image is not None]
        return self.prepare([images[i] for i in good]), good

    def __call__(self, images, *, epoch: int = 0, indices=None, dtype=torch.float32):
        """uint8 (3, h, w) images -> the net's input (a list of tensors in `whole` mode)."""
        return to_float(self.prepare(images), dtype)


def training(
    *,
    scale: tuple[int, int] = PAPER_SCALE,
    crop: int = PAPER_CROP,
    color_shift_std: float = 0.1,
    normalize: str = "paper",
    stats: ColorStats | None = None,
    seed: int = 0,
) -> TrainingPreset:
    """The training preset (Sect. 3.1); `scale=(S, S)` for fixed-scale training."""
    return TrainingPreset(
        scale=(int(scale[0]), int(scale[1])), crop=crop, color_shift_std=color_shift_std,
        normalize=normalize, stats=stats or ColorStats(), seed=seed,
    )  # fmt: skip


def evaluation(
    *,
    scale: int = 256,
    crop: int | None = PAPER_CROP,
    whole: bool = False,
    normalize: str = "paper",
    stats: ColorStats | None = None,
) -> EvalPreset:
    """The evaluation preset (Sect. 3.2): rescale to Q = `scale`, centre crop, or with
    `whole=True` the uncropped image for dense evaluation."""
    return EvalPreset(
        scale=scale, crop=None if whole else crop, normalize=normalize, stats=stats or ColorStats()
    )
