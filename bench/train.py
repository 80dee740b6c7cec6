"""Training throughput of a preset on this machine, split into data loading, decomposition and the model step.

    python bench/train.py [--config configs/train/tiny.yaml] [--steps 20] [--threads 2] [--set key=value ...]

Each stage is timed on its own over the same batches (the loader streaming and decoding shards; the frozen
decomposers batched under no_grad, plus the noise draw; forward + backward + clip + AdamW under the run's
precision), then the whole training step as the training loop runs it. The table gives ms per batch, the
images/s each stage alone would allow and its share of the step, so the slowest part is visible.
Needs the preset's shards (for tiny: composer-diffusion scenes --num 20000 --size 64 --out data/scenes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from composer.config import load_config  # noqa: E402
from composer.data.loader import make_loader  # noqa: E402
from composer.diffusion.dropout import DropoutPolicy  # noqa: E402
from composer.models.config import build_model, count_parameters  # noqa: E402
from composer.train.accelerator import make_accelerator  # noqa: E402
from composer.train.loop import (  # noqa: E402
    apply_memory_format,
    make_denoiser,
    make_noise_scheduler,
    make_optimizer,
    timestep_bounds,
)
from composer.train.module import TrainingModule  # noqa: E402
from composer.train.schedule import make_lr_scheduler  # noqa: E402
from composer.train.step import TrainingStep  # noqa: E402
from decomposers.set import DecomposerSet  # noqa: E402


def build_step(cfg) -> tuple[TrainingStep, torch.nn.Module]:
    """The training loop's own step object for a preset (no checkpoints, no EMA)."""
    tcfg = cfg.train
    accelerator = make_accelerator(device=tcfg.device, mixed_precision=tcfg.mixed_precision)
    decomposers = DecomposerSet.from_config(cfg.decomposers).to(accelerator.device)
    trainable = {n: d for n, d in decomposers.decomposers.items() if getattr(d, "trainable", False)}
    unet = build_model(cfg.model, decomposers.specs())
    module = TrainingModule(unet, trainable).train()
    apply_memory_format(module, tcfg.memory_format, accelerator.device, accelerator.mixed_precision)
    optimizer = make_optimizer(module, tcfg, accelerator.device)
    lr_scheduler = make_lr_scheduler(optimizer, images_per_step=int(cfg.data.batch_size), warmup_images=0,
                                     total_images=10**9, schedule="constant", min_factor=1.0)
    module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    step = TrainingStep(accelerator=accelerator, module=module, optimizer=optimizer, lr_scheduler=lr_scheduler,
                        decomposers=decomposers, denoiser=make_denoiser(tcfg, make_noise_scheduler(tcfg)),
                        dropout=DropoutPolicy(cfg.dropout), seed=cfg.seed, grad_clip=tcfg.grad_clip or 1.0,
                        timestep_bounds=timestep_bounds(tcfg.timestep_range, tcfg.num_train_timesteps))
    return step, unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/train/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per stage (after 2 warm-up ones)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config([args.config], args.set)
    step, unet = build_step(cfg)
    count, batch_size = args.steps + 2, int(cfg.data.batch_size)

    # 1. data: the loader alone (its workers, decoding, cropping, batching)
    loader = iter(make_loader(cfg.data, seed=cfg.seed, rank=0, world_size=1))
    batches, data_times = [], []
    for _ in range(count):
        start = time.perf_counter()
        batches.append(next(loader))
        data_times.append(time.perf_counter() - start)

    # 2. decomposition of those batches (frozen decomposers, no_grad) + dropout masks + noising
    decompose_times = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        step.inputs(batch, index * batch_size)
        decompose_times.append(time.perf_counter() - start)

    # 3. the model step alone: micro-batch times split by the step itself, plus the optimizer update
    model_times = []
    for index, batch in enumerate(batches):
        micro = step.micro_batch(batch, index * batch_size)
        start = time.perf_counter()
        step.update(micro.finite)
        model_times.append(micro.times["model"] + time.perf_counter() - start)

    # 4. the whole step, as the loop runs it (fresh batches from the same loader)
    step_times = []
    for index in range(count):
        start = time.perf_counter()
        micro = step.micro_batch(next(loader), (count + index) * batch_size)
        step.update(micro.finite)
        step_times.append(time.perf_counter() - start)
    decomposers, accelerator = step.decomposers, step.accelerator
    trainable = step.trainable

    def median_ms(values):
        return statistics.median(values[2:]) * 1000

    rows = [("data loading", median_ms(data_times)), ("decomposition (frozen, no_grad) + noising",
                                                      median_ms(decompose_times)),
            ("model step (fwd + bwd + AdamW)", median_ms(model_times))]
    total = median_ms(step_times)
    print(f"preset {args.config}: {count_parameters(unet) / 1e6:.1f} M params, batch {batch_size}, "
          f"precision {accelerator.mixed_precision}, {torch.get_num_threads()} threads, "
          f"loader workers {cfg.data.num_workers}, decomposers {', '.join(decomposers.names)}"
          f"{' (trainable: ' + ', '.join(trainable) + ')' if trainable else ''}")
    print("| stage | ms / batch | images/s alone | share of the sum |")
    print("|---|---|---|---|")
    summed = sum(ms for _, ms in rows)
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {batch_size * 1000 / ms:.1f} | {100 * ms / summed:.0f} % |")
    print(f"| **full step** (median of {args.steps}) | {total:.1f} | **{batch_size * 1000 / total:.1f}** | |")
    slowest = max(rows, key=lambda r: r[1])[0]
    print(f"slowest stage: {slowest}")


if __name__ == "__main__":
    main()
