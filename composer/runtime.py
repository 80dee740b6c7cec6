"""The runtime vocabulary, one for every command and the trainer: devices and precisions.

devices:    "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N"
precisions: "auto" (bf16 where the device runs it natively, fp16 on GPUs without bf16, else fp32),
            "bf16", "fp16" (GPUs only: emulated on a CPU at 1-3 GFLOP/s), "fp32" ("no" is accelerate's word
            for fp32 and is accepted as such)
"""

from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ALIASES = {"no": "fp32", "false": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # "false": YAML reads no as False


def gpu_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A torch.device for a device name; "auto" is CUDA when available, else the CPU."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if gpu_available() else "cpu")
    if name.startswith("cuda"):
        if not gpu_available():
            raise ValueError(f"device {name!r}: no GPU is available here; use --device cpu (or auto)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 natively (AVX-512 BF16 or AMX on x86)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def cpu_capability() -> str:
    """The vector unit torch's CPU kernels use here ("AVX512", "AVX2", ...), as torch reports it."""
    return getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()


def describe_precision(mixed_precision: str, device: torch.device | str) -> str:
    """One line for a run's log: the compute precision ("bf16", "fp16" or "no" as accelerate names it) and why.

    On a CPU without native bf16 (AVX2 only, e.g. many AMD EPYC and older Xeon parts) bf16 autocast is
    emulated: measured on such a 2-core machine, the tiny preset's training step took 61.8 s in bf16 against
    2.9 s in fp32, so "auto" picks fp32 there and an explicit bf16 is warned about."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"precision: {mixed_precision if mixed_precision != 'no' else 'fp32'} on {device.type}"
    capability = cpu_capability()
    native = cpu_supports_bf16()
    if mixed_precision == "bf16" and not native:
        return (f"precision: bf16 -- WARNING: this CPU ({capability}) has no native bf16, so every bf16 op is "
                "emulated (about 20x slower than fp32 here); set train.mixed_precision=auto or fp32")
    if mixed_precision == "bf16":
        return f"precision: bf16 (this CPU runs it natively: {capability})"
    reason = "no native bf16 on this CPU" if not native else "asked for"
    return f"precision: fp32 ({reason}; {capability})"


def canonical_precision(precision: str) -> str:
    precision = ALIASES.get(str(precision).lower(), str(precision).lower())
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device`` (torch.float32 means no autocast)."""
    device = torch.device(device)
    precision = canonical_precision(precision)
    if precision == "fp16":
        if device.type == "cpu":
            raise ValueError("fp16 is emulated on the CPU (1-3 GFLOP/s); use precision bf16 or fp32")
        return torch.float16
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def accelerate_mixed_precision(precision: str, device: torch.device | str) -> str:
    """accelerate's mixed_precision word ("bf16", "fp16" or "no") for ``precision`` on ``device``."""
    dtype = resolve_precision(precision, device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def autocast(precision: str, device: torch.device | str):
    """A context manager running the block in the resolved precision."""
    device = torch.device(device)
    dtype = resolve_precision(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
