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


class _Quiet:
    def add_image(self, *args, **kwargs):
        pass

    def write(self, message: str) -> None:
        print(message)


def main(argv: list[str] | None = None) -> int:
    from composer.config import load_config
    from composer.train.loop import _held_out_batch, _sample_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pipeline folder (e.g. runs/tiny/pipeline)")
    parser.add_argument("--config", required=True, help="training preset the model was trained with")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sampler", default=None, help="override the model's sampler")
    args = parser.parse_args(argv)
    cfg = load_config([args.config], args.set)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        print(f"error: {model} is not a pipeline folder (no model_index.json); pass e.g. runs/tiny/pipeline")
        return 2
    batch = _held_out_batch(cfg, torch.device("cpu"))
    if args.sampler:
        import json
        index = json.loads((model / "model_index.json").read_text())
        if index.get("sampler") != args.sampler:  # render from a scratch copy with the other sampler
            scratch = Path(args.out).with_suffix(".model-tmp")
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(model, scratch)
            index["sampler"] = args.sampler
            (scratch / "model_index.json").write_text(json.dumps(index))
            model = scratch
    path = _sample_grid(model, batch, cfg, 0, _Quiet(), torch.device("cpu"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), out)
    if model != Path(args.model):
        shutil.rmtree(model, ignore_errors=True)
    print(f"grid -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
