"""What only a GPU can show: skipped without CUDA; benchmarks/gpu.sh runs them on the GPU box
before it measures anything. The peak table is checked on every machine."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peak import spec_peak_tflops  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mfu_is_against_the_parts_own_datasheet_peak():
    assert spec_peak_tflops("NVIDIA H200") == 989.0  # SXM, as nvidia-smi names it
    assert spec_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert spec_peak_tflops("NVIDIA H200", power_limit=600.0) == 835.0  # an NVL by its power
    assert spec_peak_tflops("NVIDIA H100 80GB HBM3", power_limit=700.0) == 989.0
    assert spec_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert spec_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert spec_peak_tflops("Tesla T4") is None  # unknown: the benchmark asks for --peak-tflops


@cuda
def test_this_gpu_has_a_known_peak():
    assert spec_peak_tflops(torch.cuda.get_device_name(0)) is not None


@cuda
def test_batches_made_one_ahead_on_a_side_stream_equal_those_made_in_line():
    from vgg_ray.data import one_batch_ahead

    device = torch.device("cuda")
    weights = torch.randn(2048, 2048, device=device)

    def batches(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        for _ in range(6):  # enough work per batch that a missing wait would show stale data
            x = torch.randn(2048, 2048, device=device, generator=generator)
            for _ in range(8):
                x = torch.tanh(x @ weights)
            yield x, x.sum()

    in_line = [tuple(t.clone() for t in b) for b in batches(0)]
    ahead = []
    for x, total in one_batch_ahead(batches(0), device):
        (x @ weights).sum()  # the caller's own work on the current stream meanwhile
        ahead.append((x.clone(), total.clone()))
    assert len(ahead) == len(in_line) == 6
    for (x, total), (y, expected) in zip(ahead, in_line, strict=True):
        assert torch.equal(x, y) and torch.equal(total, expected)
