"""Train the shipped scene CLIP (assets/scene-clip/) on synthetic scenes, or evaluate a saved one.

    python scripts/train_scene_clip.py --out runs/scene-clip --export assets/scene-clip/scene-clip-tiny.safetensors
    python scripts/train_scene_clip.py --evaluate assets/scene-clip/scene-clip-tiny.safetensors

Training resumes from ``OUT/training_state.safetensors`` when it exists. See composer/train/scene_clip.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from composer.train import scene_clip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/scene-clip", help="run folder (checkpoint, history, metrics)")
    parser.add_argument("--export", default=None, help="write the final weights (fp16 safetensors) here")
    parser.add_argument("--evaluate", default=None, metavar="WEIGHTS", help="only evaluate these weights")
    defaults = scene_clip.SceneClipConfig()
    for item in fields(scene_clip.SceneClipConfig):
        value = getattr(defaults, item.name)
        kind = type(value) if value is not None else (int if item.name == "threads" else str)
        if kind is bool:
            parser.add_argument(f"--{item.name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"),
                                default=value)
        else:
            parser.add_argument(f"--{item.name.replace('_', '-')}", type=kind, default=value)
    args = parser.parse_args(argv)
    config = scene_clip.SceneClipConfig(**{item.name: getattr(args, item.name) for item in fields(scene_clip.SceneClipConfig)})
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)

    if args.evaluate:
        import open_clip

        model = scene_clip.load_scene_clip(args.evaluate, config.model_config_file, config.model_name)
        metrics = scene_clip.evaluate_scene_clip(model, open_clip.get_tokenizer(config.model_name), config.eval_seed,
                                                 config.eval_scenes, config.probe_scenes, config.image_size)
        print(json.dumps(metrics, indent=2))
        return 0

    result = scene_clip.train_scene_clip(config, args.out, log=lambda line: print(line, flush=True))
    metrics = result["metrics"]
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2), flush=True)
    if args.export:
        scene_clip.export_weights(result["model"], args.export)
        print(f"wrote {args.export} ({Path(args.export).stat().st_size / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
