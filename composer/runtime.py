"""Mixed precision: bf16 autocast where the device supports it, fp32 otherwise, never fp16 on a CPU."""

from __future__ import annotations

import contextlib

import torch

CHOICES = ("auto", "bf16", "fp32")


def cpu_supports_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device`` (torch.float32 means no autocast)."""
    device = torch.device(device)
    if precision in ("fp16", "float16"):
        if device.type == "cpu":
            raise ValueError("fp16 is emulated on the CPU (1-3 GFLOP/s); use precision=bf16 or fp32")
        return torch.float16
    if precision not in CHOICES:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(CHOICES)} (or fp16 on a GPU)")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def autocast(precision: str, device: torch.device | str):
    """A context manager running the block in the resolved precision."""
    device = torch.device(device)
    dtype = resolve_precision(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
