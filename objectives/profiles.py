"""Device profiles for the roofline latency model: memory bandwidth and dense 16-bit peak.

Figures are the vendors' datasheet numbers (dense, no sparsity), scaled by an achievable
fraction; :mod:`hpsearch.objectives.latency` reports which profile a value came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpsearch.errors import ConfigError

__all__ = ["DeviceProfile", "PROFILES", "get_profile"]


@dataclass(frozen=True)
class DeviceProfile:
    """Peak numbers of one device and the share of them real kernels reach."""

    name: str
    bandwidth: float  # bytes/s
    peak_flops: float  # 16-bit dense FLOP/s
    bandwidth_efficiency: float = 0.8
    flops_efficiency: float = 0.6
    launch_overhead_s: float = 0.0  # per decoder block and step, 0 under CUDA graphs


PROFILES = {
    # H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense.
    "h100": DeviceProfile("h100", 3.35e12, 989e12),
    # A100 SXM 80GB: 2.04 TB/s, 312 TFLOP/s.
    "a100": DeviceProfile("a100", 2.039e12, 312e12),
    # RTX 4090: 1.008 TB/s, 165 TFLOP/s fp16 with fp32 accumulation.
    "rtx4090": DeviceProfile("rtx4090", 1.008e12, 165e12),
    # A two-channel DDR4/5 desktop CPU, eager PyTorch.
    "cpu": DeviceProfile("cpu", 50e9, 1e12, bandwidth_efficiency=0.5, flops_efficiency=0.3, launch_overhead_s=20e-6),
}


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError("objectives.latency.profile", f"{name!r} is not allowed; allowed: {', '.join(PROFILES)}") from None
