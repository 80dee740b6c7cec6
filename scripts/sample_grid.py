"""Render the training sample grid (all / none / each single condition) for any pipeline folder.

    python scripts/sample_grid.py --model runs/tiny/pipeline --config configs/train/tiny.yaml --out grid.png \
        [--set train.sample_images=6 --set sample.scheduler=ddim]

Uses the same held-out batch, seeds and subsets as the grids written during training (train.sample_shards).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from composer.config import load_config
    from composer.diffusion.schedulers import SAMPLER_NAMES, make_scheduler
    from composer.pipelines import ComposerPipeline, layout
    from composer.train.samples import held_out_batch, sample_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pipeline folder (e.g. runs/tiny/pipeline)")
    parser.add_argument("--config", required=True, help="training preset the model was trained with")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, help="override the model's sampler")
    args = parser.parse_args(argv)
    cfg = load_config([args.config], args.set)
    model = Path(args.model)
    if not layout.is_pipeline_folder(model):
        print(f"error: {model} is not a pipeline folder (no model_index.json); pass e.g. runs/tiny/pipeline")
        return 2
    batch = held_out_batch(cfg, torch.device("cpu"))
    scratch = None
    if args.sampler:  # render from a scratch copy whose saved sampler is the other one
        pipe = ComposerPipeline.from_pretrained(model)
        pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
        scratch = Path(args.out).with_suffix(".model-tmp")
        layout.publish(pipe, scratch)
        model = scratch
    drawn = sample_grid(model, batch, 0, torch.device("cpu"), out=args.out)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    if drawn is None:
        print("error: no held-out images (set train.sample_shards to shards that exist)")
        return 2
    print(f"grid -> {drawn[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
