"""The accelerate glue: device, mixed precision and process group for one training run.

accelerate is the only distribution engine: ``accelerate launch`` (DDP, FSDP or DeepSpeed from its own
config) starts the processes and ``Accelerator`` joins them. Two traps are caught here:
on a machine without GPUs ``accelerate launch --multi_gpu`` starts processes that never form a group
unless the Accelerator is told to use the CPU (then gloo); and fp16 autocast on a CPU is emulated and
slow, so it is refused there.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

PRECISIONS = ("auto", "bf16", "fp16", "no")


def gpu_available() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 natively (AVX-512 BF16 / AMX on x86, bf16 extensions on ARM)."""
    from accelerate.utils import is_bf16_available

    try:
        return bool(is_bf16_available(ignore_tpu=True)) and torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    except Exception:
        return False


def resolve_mixed_precision(requested: str, use_cpu: bool) -> str:
    """accelerate's mixed_precision string for ``train.mixed_precision`` on this device."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "auto":
        if use_cpu:
            return "bf16" if cpu_supports_bf16() else "no"
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and use_cpu:
        raise ValueError(
            "train.mixed_precision=fp16 is emulated (and about 100x slower) on a CPU; use bf16 or no"
        )
    return requested


def make_accelerator(*, device: str = "auto", mixed_precision: str = "auto", grad_accumulation: int = 1,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator for this process (launched by ``accelerate launch``, torchrun, or plain python).

    device: "auto" (a GPU when present) or "cpu". Unused parameters are allowed in DDP because a batch
    in which every sample dropped a condition does not touch that condition's adapter.
    """
    if device not in ("auto", "cpu"):
        raise ValueError(f"train.device must be 'auto' or 'cpu', got {device!r}; pick GPUs with accelerate launch")
    if grad_accumulation < 1:
        raise ValueError(f"train.grad_accumulation must be at least 1, got {grad_accumulation}")
    use_cpu = device == "cpu" or not gpu_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "1", "true", "yes",
    )
    precision = resolve_mixed_precision(mixed_precision, use_cpu)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accumulation,
        step_scheduler_with_optimizer=False,  # our scheduler is stepped once per optimizer update, by hand
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        project_dir=project_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate formed a group of {accelerator.num_processes}; "
            "on a CPU launch with `accelerate launch --multi_gpu --num_processes N` and ACCELERATE_USE_CPU=true"
        )
    return accelerator
