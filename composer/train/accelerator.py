"""The accelerate glue: device, mixed precision and process group for one training run.

accelerate is the only distribution engine: ``accelerate launch`` (DDP, FSDP or DeepSpeed from its own
config) starts the processes and ``Accelerator`` joins them. Two traps are caught here:
on a machine without GPUs ``accelerate launch --multi_gpu`` starts processes that never form a group
unless the Accelerator is told to use the CPU (then gloo); and fp16 autocast on a CPU is emulated and
slow, so it is refused there.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from composer.runtime import PRECISIONS, accelerate_mixed_precision, canonical_precision, gpu_available


def resolve_mixed_precision(requested: str, use_cpu: bool) -> str:
    """accelerate's mixed_precision word for ``train.mixed_precision`` (composer.runtime's vocabulary, "no"
    accepted for fp32). "auto" respects accelerate's own setting (``accelerate config`` / ``accelerate launch
    --mixed_precision``, seen as ACCELERATE_MIXED_PRECISION) and otherwise picks bf16 where it is native."""
    try:
        precision = canonical_precision(requested)
    except ValueError:
        raise ValueError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)} (or no), got {requested!r}") from None
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if precision == "auto" and (launched in ("bf16", "fp16") or (launched == "no" and launcher_chose_fp32())):
        precision = canonical_precision(launched)
    if precision == "fp16" and use_cpu:
        raise ValueError("train.mixed_precision=fp16 is emulated (and about 100x slower) on a CPU; use bf16 or fp32")
    return accelerate_mixed_precision(precision, "cpu" if use_cpu else "cuda")


def launcher_chose_fp32(parent_argv: list[str] | None = None) -> bool:
    """Whether ACCELERATE_MIXED_PRECISION=no is the user's choice. ``accelerate launch`` writes "no" also when
    it was given neither --mixed_precision nor a config file (its warning "`--mixed_precision` was set to a
    value of 'no'"); taken as a choice, that default ran every multi-process CPU run in fp32, at half the
    speed (2 gloo processes of 1 thread: 11.5 images/s in fp32, measured 2026-12-03). It is a choice when the
    launcher's command line names --mixed_precision or a config file, or accelerate's default config file
    exists; when the launcher's command line cannot be read (not Linux), it is taken as one."""
    if parent_argv is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return True
        parent_argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    if any(arg == "--mixed_precision" or arg.startswith("--mixed_precision=") for arg in parent_argv):
        return True
    if any(arg == "--config_file" or arg.startswith("--config_file=") for arg in parent_argv):
        return True
    if os.environ.get("ACCELERATE_CONFIG_FILE"):
        return True
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:  # a future accelerate moved it: keep honouring the variable
        return True
    return Path(default_config_file).is_file()


def make_accelerator(*, device: str = "auto", mixed_precision: str = "auto", grad_accumulation: int = 1,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator for this process (launched by ``accelerate launch``, torchrun, or plain python).

    device: "auto" (a GPU when present) or "cpu". Unused parameters are allowed in DDP because a batch
    in which every sample dropped a condition does not touch that condition's adapter.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {device!r}; pick GPUs with accelerate launch")
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
