"""The paper's image recipe (PAPER.md, Sect. 3.1/3.2) on tiny images: shapes, the random draws'
distributions, the colour shift's covariance, determinism, and the CPU/GPU paths agreeing."""

import contextlib
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from vgg_ray import transforms as T
from vgg_ray.demo import real_photos
from vgg_ray.errors import ConfigError

# A rotation, so that a wrong eigvec convention (rows for columns) shows in the covariance test.
STATS = T.ColorStats(
    mean_rgb=(120.0, 110.0, 100.0),
    eigval=(4000.0, 900.0, 100.0),
    eigvec=((0.6, 0.8, 0.0), (-0.8, 0.6, 0.0), (0.0, 0.0, 1.0)),
)


def smooth_image(height: int, width: int, seed: int = 0, detail: int = 4) -> torch.Tensor:
    """A smooth uint8 (3, h, w) image: resampling differences stay small on it."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.integers(0, 256, (3, detail, detail + 1), np.uint8))
    return F.resize(low, [height, width], antialias=True)


def jpeg(image: torch.Tensor, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).convert(mode).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def reference(image: torch.Tensor, *, short_side: int, crop: int, top: int, left: int, flip: bool):
    """The paper's order of operations, literally: rescale the whole image, crop, flip."""
    rescaled = F.resize(image, [short_side], antialias=True)
    cropped = rescaled[:, top : top + crop, left : left + crop]
    return cropped.flip(-1) if flip else cropped


def test_importable_without_ray_pyarrow_or_mlflow():
    code = (
        "import sys, vgg_ray.transforms; "
        "bad = {'ray', 'pyarrow', 'mlflow'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_output_shape_dtype_and_range():
    images = [smooth_image(40, 56, 1), smooth_image(64, 36, 2), smooth_image(33, 33, 3)]
    preset = T.training(scale=(32, 64), crop=32, color_shift_std=0.0, stats=STATS)
    out = preset(images, epoch=0, indices=[0, 1, 2])
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    mean = torch.tensor(STATS.mean_rgb)[:, None, None]
    assert (out >= -mean).all() and (out <= 255 - mean).all()
    half = preset(images, epoch=0, indices=[0, 1, 2], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out, atol=1.0, rtol=0.01)
    tv = T.training(scale=(32, 64), crop=32, color_shift_std=0.0, normalize="torchvision")
    out = tv(images, epoch=0, indices=[0, 1, 2])
    assert out.min() >= (0 - 0.485) / 0.229 - 1e-4 and out.max() <= (1 - 0.406) / 0.225 + 1e-4


def test_scale_jitter_is_uniform_and_fixed_scale_exact():
    draws = T.training(scale=(32, 64), crop=32).draw(range(6600), epoch=3)
    counts = np.bincount(draws.scale - 32, minlength=33)
    assert draws.scale.min() == 32 and draws.scale.max() == 64 and len(counts) == 33
    # 200 expected per value; a chi-square over 32 degrees of freedom stays below 70 (p < 1e-4).
    assert ((counts - 200) ** 2 / 200).sum() < 70
    assert (T.training(scale=(48, 48), crop=32).draw(range(500), epoch=0).scale == 48).all()
    assert 0.45 < draws.flip.mean() < 0.55  # the flip: half the time
    assert 0.45 < draws.top.mean() < 0.55 and draws.left.min() >= 0 and draws.left.max() < 1


@pytest.mark.parametrize("size", [(48, 64), (64, 40), (20, 30)])  # down-, down-, up-scaled
def test_crop_first_equals_rescale_then_crop(size):
    """Our geometry resizes only the crop's source window; it must match the literal recipe up
    to the window's rounding to whole source pixels (< 1 px: a few grey levels on a gradient)."""
    image = smooth_image(*size, seed=size[0], detail=2)
    preset = T.training(scale=(32, 60), crop=32, color_shift_std=0.0, stats=STATS)
    # Grey levels per source pixel, summed over both axes: what misplacing the window by up to
    # one source pixel in each can cost (+1 for the two sides' uint8 rounding).
    per_pixel = sum(float(image.float().diff(dim=d).abs().mean()) for d in (1, 2))
    indices = list(range(40))
    prepared = preset.prepare([image] * 40, epoch=0, indices=indices)
    draws = preset.draw(indices, epoch=0)
    for i in indices:
        s = int(draws.scale[i])
        rescaled_h, rescaled_w = T.rescaled_size(*size, s)
        top = int(draws.top[i] * (rescaled_h - 32 + 1))
        left = int(draws.left[i] * (rescaled_w - 32 + 1))
        expected = reference(image, short_side=s, crop=32, top=top, left=left, flip=draws.flip[i])
        difference = (prepared.pixels[i].float() - expected.float()).abs()
        assert difference.mean() < per_pixel + 1, (i, s, difference.mean(), per_pixel)
        # The window itself: within one source pixel of the exact one.
        ratio = size[0] / rescaled_h
        y, x, h, w = T.source_window(*size, short_side=s, crop=32, top=top, left=left)
        assert abs(y - top * ratio) <= 1 and abs(x - left * ratio) <= 1
        assert abs(h - 32 * ratio) <= 0.5 and abs(w - 32 * ratio) <= 0.5
        assert y + h <= size[0] and x + w <= size[1]


def test_color_shift_covariance_and_mean_subtraction():
    preset = T.training(scale=(32, 32), crop=32, color_shift_std=0.1, stats=STATS)
    draws = preset.draw(range(20000), epoch=0)
    shifts = preset.color_shift(draws.alpha).double()
    eigvec = torch.tensor(STATS.eigvec, dtype=torch.float64)
    eigval = torch.tensor(STATS.eigval, dtype=torch.float64) / 255  # 0..1-scale formula
    expected = eigvec @ torch.diag((0.1 * eigval) ** 2) @ eigvec.T
    observed = torch.cov(shifts.T)
    assert torch.allclose(observed, expected, atol=0.05 * expected.abs().max())
    assert shifts.mean(0).abs().max() < 0.05 * eigval[0] * 0.1 * 3
    # Applied: a flat grey image comes out as grey + its shift - the mean RGB, in every pixel.
    grey = torch.full((3, 40, 50), 100, dtype=torch.uint8)
    out = preset([grey] * 4, epoch=0, indices=range(4))
    shift = preset.color_shift(preset.draw(range(4), epoch=0).alpha)
    want = 100 + shift - torch.tensor(STATS.mean_rgb)
    torch.testing.assert_close(out, want[:, :, None, None].expand_as(out))
    tv = T.training(scale=(32, 32), crop=32, color_shift_std=0.0, normalize="torchvision")
    out = tv([grey], epoch=0, indices=[0])
    want = (100 / 255 - torch.tensor(T.TORCHVISION_MEAN)) / torch.tensor(T.TORCHVISION_STD)
    torch.testing.assert_close(out[0], want[:, None, None].expand(3, 32, 32))


def test_draws_are_a_function_of_seed_epoch_and_row():
    images = [smooth_image(48, 64, i) for i in range(4)]
    preset = T.training(scale=(32, 64), crop=32, stats=STATS, seed=7)
    a = preset(images, epoch=2, indices=[10, 11, 12, 13])
    torch.testing.assert_close(a, preset(images, epoch=2, indices=[10, 11, 12, 13]), rtol=0, atol=0)
    # A row's augmentation does not depend on its batch or position in it.
    b = preset(images[::-1], epoch=2, indices=[13, 12, 11, 10])
    torch.testing.assert_close(a, b.flip(0), rtol=0, atol=0)
    assert not torch.equal(a, preset(images, epoch=3, indices=[10, 11, 12, 13]))
    other_seed = T.training(scale=(32, 64), crop=32, stats=STATS, seed=8)
    assert not torch.equal(a, other_seed(images, epoch=2, indices=[10, 11, 12, 13]))


def test_evaluation_centre_crop_and_whole():
    image = smooth_image(48, 80)
    preset = T.evaluation(scale=40, crop=32, stats=STATS)
    out = preset([image])
    expected = F.center_crop(F.resize(image, [40], antialias=True), [32, 32]).float()
    expected -= torch.tensor(STATS.mean_rgb)[:, None, None]
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[0], expected)  # the literal recipe: torchvision's numbers
    whole = T.evaluation(scale=40, whole=True, stats=STATS)([image, smooth_image(64, 48)])
    assert [w.shape for w in whole] == [(3, 40, 66), (3, 53, 40)]


def test_bad_presets_are_config_errors():
    with pytest.raises(ConfigError, match="Smin <= Smax"):
        T.training(scale=(64, 32), crop=32)
    with pytest.raises(ConfigError, match="larger than the smallest scale"):
        T.training(scale=(32, 64), crop=48)
    with pytest.raises(ConfigError, match="normalize"):
        T.training(scale=(32, 64), crop=32, normalize="imagenet")
    with pytest.raises(ConfigError, match="eval scale"):
        T.evaluation(scale=24, crop=32)


def test_decode_cpu_reports_bad_records():
    image = smooth_image(40, 48)
    decoded = T.decode_cpu([jpeg(image), b"not a jpeg", b"", jpeg(image, "L")])
    assert decoded[1] is None and decoded[2] is None
    assert decoded[0].shape == (3, 40, 48) and decoded[0].dtype == torch.uint8
    assert decoded[3].shape == (3, 40, 48)  # grayscale comes out as RGB
    assert (decoded[0].float() - image.float()).abs().mean() < 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_agrees_with_cpu_path():
    device = torch.device("cuda")
    images = [smooth_image(48, 64, i) for i in range(6)]
    data = [jpeg(image) for image in images] + [b"garbage"]
    on_gpu = T.decode_gpu(data, device)
    assert on_gpu[-1] is None and all(i.is_cuda for i in on_gpu[:-1])
    on_cpu = T.decode_cpu(data)
    for g, c, image in zip(on_gpu[:-1], on_cpu[:-1], images, strict=True):
        # Both decoders give back the image; nvjpeg upsamples chroma more coarsely (~3 levels).
        assert (c.float() - image.float()).abs().mean() < 2.0
        assert (g.cpu().float() - image.float()).abs().mean() < 4.0
    preset = T.training(scale=(32, 64), crop=32, stats=STATS)
    cpu = preset(on_cpu[:-1], epoch=1, indices=range(6))
    gpu = preset([c.to(device) for c in on_cpu[:-1]], epoch=1, indices=range(6))
    assert gpu.is_cuda
    # The same draws and windows: only the resize's rounding differs (measured on an H200:
    # mean 0.17, max 1 grey level).
    assert (gpu.cpu() - cpu).abs().mean() < 0.5 and (gpu.cpu() - cpu).abs().max() <= 2.0
    evaluation = T.evaluation(scale=40, crop=32, stats=STATS)
    diff = evaluation([c.to(device) for c in on_cpu[:-1]]).cpu() - evaluation(on_cpu[:-1])
    assert diff.abs().max() <= 2.0


# The region-of-interest decoder (vgg_ray/_jpeg.c), where `pip install` could build it.
needs_window_decoder = pytest.mark.skipif(T._jpeg is None, reason="_vgg_ray_jpeg not built")


def photo_jpegs() -> dict[str, bytes]:
    """Real photographs encoded every way a data set holds them: the three chroma subsamplings,
    progressive, grayscale, an odd size (no whole MCUs), and the files as shipped."""
    photos = {name: path.read_bytes() for name, path in real_photos()}
    image = Image.open(io.BytesIO(photos["china"])).convert("RGB")

    def encode(im: Image.Image, **options) -> bytes:
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=90, **options)
        return buffer.getvalue()

    for subsampling, name in ((0, "444"), (1, "422"), (2, "420")):
        photos[name] = encode(image, subsampling=subsampling)
    photos["progressive"] = encode(image, progressive=True)
    photos["grayscale"] = encode(image.convert("L"))
    photos["odd"] = encode(image.crop((3, 5, 336, 406)), subsampling=2)
    return photos


@needs_window_decoder
def test_window_decode_is_exactly_the_whole_decode_there():
    rng = np.random.default_rng(0)
    for name, record in photo_jpegs().items():
        whole = T.decode_cpu([record])[0]
        height, width = whole.shape[-2:]
        assert T.jpeg_size(record) == (height, width), name
        windows = [(0, 0, height, width), (height - 7, width - 9, 7, 9), (1, 1, 1, 1)]
        for _ in range(12):
            h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
            windows.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
        for y, x, h, w in windows:
            got = T.decode_window(record, (int(y), int(x), int(h), int(w)))
            assert torch.equal(got, whole[:, y : y + h, x : x + w]), (name, (y, x, h, w))
        # At 1/2, 1/4, 1/8 inside the decoder: a window is the shrunk whole decode's pixels.
        for shrink in (2, 4, 8):
            size = (-(-height // shrink), -(-width // shrink))
            shrunk = T.decode_window(record, (0, 0, *size), shrink)
            y, x = size[0] // 3, size[1] // 4
            window = T.decode_window(record, (y, x, size[0] // 2, size[1] // 2), shrink)
            assert torch.equal(window, shrunk[:, y : y + size[0] // 2, x : x + size[1] // 2])


@needs_window_decoder
def test_window_decoder_refuses_bad_input_with_value_errors():
    record = photo_jpegs()["420"]
    height, width = T.jpeg_size(record)
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(record)).convert("CMYK").save(cmyk, "JPEG")
    bad = {
        "empty": (b"", (0, 0, 1, 1)),
        "not a jpeg": (b"not a jpeg at all", (0, 0, 1, 1)),
        "truncated": (record[: len(record) // 2], (0, 0, height, width)),
        "cmyk": (cmyk.getvalue(), (0, 0, 8, 8)),
        "outside": (record, (height - 4, 0, 8, 8)),
        "negative": (record, (-1, 0, 8, 8)),
    }
    for name, (data, window) in bad.items():
        with pytest.raises(ValueError):
            T.decode_window(data, window)
            pytest.fail(name)  # not reached where it raises; names the case where it does not
    with pytest.raises(ValueError, match="shrink must be"):
        T.decode_window(record, (0, 0, 8, 8), 3)
    # Corrupted files of every kind end in a ValueError or in pixels, never in a crash.
    rng = np.random.default_rng(1)
    for _ in range(300):
        damaged = bytearray(record)
        for position in rng.integers(0, len(damaged), rng.integers(1, 20)):
            damaged[position] = rng.integers(0, 256)
        with contextlib.suppress(ValueError):
            T.decode_window(bytes(damaged), (height // 2, width // 3, height // 2, width // 3))


def test_prepare_jpegs_is_prepare_of_the_whole_decodes(monkeypatch):
    """The decode tasks' path: the same batch as decoding whole images and preparing them, on
    real photos of every encoding, with bad records left out; also where the window decoder is
    not built (torchvision then decodes)."""
    photos = photo_jpegs()
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(photos["china"])).convert("CMYK").save(cmyk, "JPEG")
    data = [*photos.values(), b"garbage", cmyk.getvalue(), b"", photos["420"][:5000]] * 2
    indices = list(range(100, 100 + len(data)))
    preset = T.training(scale=(256, 512), crop=224, stats=STATS)
    images = T.decode_cpu(data)
    decoded = [i for i, image in enumerate(images) if image is not None]
    assert len(decoded) == 2 * (len(photos) + 1)  # the photos and the CMYK one
    for built in (T._jpeg, None):
        monkeypatch.setattr(T, "_jpeg", built)
        prepared, good = preset.prepare_jpegs(data, epoch=3, indices=indices)
        expected = preset.prepare([images[i] for i in decoded], epoch=3,
                                  indices=[indices[i] for i in decoded])  # fmt: skip
        assert good == decoded
        assert torch.equal(prepared.pixels, expected.pixels)
        assert torch.equal(prepared.gain, expected.gain)
        assert torch.equal(prepared.bias, expected.bias)
        assert prepared.windows == expected.windows


@needs_window_decoder
def test_prepare_jpegs_shrinks_large_windows_inside_the_decoder_within_tolerance():
    """A window of >= 4x the crop is decoded at 1/2, 1/4 or 1/8: its crop is the resize of the
    window it reports (boxes follow it) within a grey level on average; bicubic against
    bilinear resizing differs by 0.7-3 on these photos."""
    preset = T.training(scale=(32, 64), crop=32, stats=STATS)
    shrinks = set()
    for name, record in photo_jpegs().items():
        prepared, good = preset.prepare_jpegs([record] * 8, epoch=0, indices=range(8))
        whole = T.decode_cpu([record])[0]
        drawn = preset.prepare([whole] * 8, epoch=0, indices=range(8)).windows
        assert good == list(range(8))
        for pixels, window, exact in zip(prepared.pixels, prepared.windows, drawn, strict=True):
            # The reported window is the drawn one moved by under half a shrunk pixel.
            assert max(abs(a - b) for a, b in zip(window[:4], exact[:4], strict=True)) <= 4, name
            assert window.flip == exact.flip
            y, x, h, w = window[:4]
            expected = F.resized_crop(whole, y, x, h, w, [32, 32], antialias=True)
            expected = expected.flip(-1) if window.flip else expected
            assert (pixels.float() - expected.float()).abs().mean() < 1.5, name
            shrinks.add(T._shrunk_window(tuple(whole.shape[-2:]), exact[:4], 32)[0])
    assert shrinks >= {2, 4}  # the decoder did shrink (windows of 133-427 px for a 32 px crop)
