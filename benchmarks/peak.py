"""A GPU's dense bf16 peak from its datasheet, and the bf16 matrix rate it reaches in practice.

MFU is reported against the datasheet peak (the number the hardware is bought for); the measured
matrix-product rate beside it says how much of that peak any real kernel reaches on this chip.
The SXM and NVL parts share a name prefix but not a peak; `nvidia-smi` names an H200 SXM
"NVIDIA H200" and the NVL part "NVIDIA H200 NVL"; where a name is ambiguous, the power limit
tells them apart (SXM: 700 W; NVL: 400-600 W).
"""

from __future__ import annotations

import subprocess
import time

import torch

# Dense (not 2:4 sparse) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets.
DENSE_BF16_TFLOPS = {
    "H200 NVL": 835.0,
    "H200": 989.0,  # SXM
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def power_limit_watts(index: int = 0) -> float | None:
    """The board's power limit from nvidia-smi, or None where it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-i", str(index), "--query-gpu=power.limit",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def spec_peak_tflops(name: str, power_limit: float | None = None) -> float | None:
    """The datasheet's dense bf16 peak for a device named `name` (as torch or nvidia-smi name
    it), the longest matching entry first; None for a device not in the table. An H100/H200
    whose name does not say NVL but whose power limit is under 650 W is taken as the NVL part."""
    for part in sorted(DENSE_BF16_TFLOPS, key=len, reverse=True):
        if part in name:
            if part in ("H100", "H200") and power_limit is not None and power_limit < 650:
                return DENSE_BF16_TFLOPS[f"{part} NVL"]
            return DENSE_BF16_TFLOPS[part]
    return None


def measured_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """bf16 TFLOP/s of a large square matrix product on `device`: the practical ceiling."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def device_peak(device: torch.device, override: float | None = None) -> dict:
    """{name, power_limit_w, spec_peak_tflops, matmul_tflops} of a CUDA device; `override`
    (--peak-tflops) replaces the datasheet figure, e.g. for a part not in the table."""
    name = torch.cuda.get_device_name(device)
    power = power_limit_watts(device.index or 0)
    peak = override if override is not None else spec_peak_tflops(name, power)
    if peak is None:
        raise SystemExit(f"no datasheet bf16 peak known for {name!r}: pass --peak-tflops")
    return {"name": name, "power_limit_w": power, "spec_peak_tflops": peak,
            "matmul_tflops": measured_matmul_tflops(device)}  # fmt: skip
