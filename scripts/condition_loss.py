"""Held-out reconstruction error of a pipeline under each condition subset, per noise level.

    python scripts/condition_loss.py --model runs/tiny/pipeline --config configs/train/tiny.yaml \
        [--num 64] [--timesteps 300,500,700,850,950] [--set key=value ...]

Noises a fixed held-out batch (train.sample_shards of the preset, the batch the sample grids use) to each
level t, asks the UNet for its prediction under: all conditions, none, and each condition alone, converts it
to an x0 estimate (clamped to [-1, 1]) and prints the mean squared error against the clean images. A
condition the model uses lowers the error below the `none` row; a condition it ignores leaves the row equal
to `none`. The last column averages over t uniform in [0, T) (the training distribution of noise levels),
the model's held-out denoising error as a whole. Single forward passes, no guidance, no sampling.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


@torch.no_grad()
def condition_errors(model: str | Path, cfg, num: int, timesteps: list[int], seed: int = 0,
                     uniform_draws: int = 8) -> tuple[list[str], dict[str, list[float]]]:
    from composer.pipelines import ComposerPipeline
    from composer.train.samples import centre_mask, condition_subsets, held_out_batch
    from composer.train.step import batch_extras

    device = torch.device("cpu")
    cfg.train.sample_images = num
    batch = held_out_batch(cfg, device)
    if batch is None:
        raise SystemExit("error: no held-out images (set train.sample_shards to shards that exist)")
    pipe = ComposerPipeline.from_pretrained(model)
    denoiser = pipe.denoiser
    images = batch["image"]
    x0 = images * 2 - 1
    conditions = pipe.decomposers.decompose(images, captions=batch["caption"], extras=batch_extras(batch, device),
                                            training=False, mask=centre_mask(images))
    total = denoiser.schedule.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    fixed = [(torch.full((x0.shape[0],), t, dtype=torch.long), torch.randn(x0.shape, generator=generator))
             for t in timesteps]
    uniform = [(torch.randint(0, total, (x0.shape[0],), generator=generator), torch.randn(x0.shape, generator=generator))
               for _ in range(uniform_draws)]

    def error(subset: list[str], t: torch.Tensor, noise: torch.Tensor) -> float:
        x_t = denoiser.add_noise(x0, noise, t)
        estimate, _ = denoiser.split(x_t, t, denoiser(x_t, t, conditions.subset(subset)))
        return ((estimate.clamp(-1, 1) - x0) ** 2).mean().item()

    rows: dict[str, list[float]] = {}
    for label, subset in condition_subsets(pipe.decomposers.names):
        values = [error(subset, t, noise) for t, noise in fixed]
        values.append(sum(error(subset, t, noise) for t, noise in uniform) / len(uniform))
        rows[label] = values
    return [f"t={t}" for t in timesteps] + ["t~U"], rows


def main(argv: list[str] | None = None) -> int:
    from composer.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pipeline folder (e.g. runs/tiny/pipeline)")
    parser.add_argument("--config", required=True, help="training preset the model was trained with")
    parser.add_argument("--num", type=int, default=64, help="held-out images (default 64)")
    parser.add_argument("--timesteps", default="300,500,700,850,950")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from composer.pipelines.layout import is_pipeline_folder

    if not is_pipeline_folder(args.model):
        print(f"error: {args.model} is not a pipeline folder (no model_index.json); pass e.g. runs/tiny/pipeline")
        return 2
    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        print(f"error: --timesteps must be comma-separated integers, got {args.timesteps!r}")
        return 2
    cfg = load_config([args.config], args.set)
    columns, rows = condition_errors(args.model, cfg, args.num, timesteps, args.seed)
    print(f"held-out x0 MSE ({args.num} images, {args.model})")
    print("| subset | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, values in rows.items():
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
