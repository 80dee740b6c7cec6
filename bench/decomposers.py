"""Decomposer cost on the CPU: ms per image at batch 1 and batch 16, and batched vs per-image loop.

Pretrained decomposers use real-size architectures with random weights (speed does not depend on the
weights): open_clip ViT-B-32, YOLOv8n-seg, Depth Anything V2 Small layout (run at 252 px). Inputs are real
photos (scikit-image, ultralytics assets) resized to --size.

    python bench/decomposers.py [--size 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the package it measures: keep its own folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from decomposers.registry import get_decomposer  # noqa: E402


def photos(size: int, count: int) -> torch.Tensor:
    import ultralytics
    from PIL import Image
    from skimage import data

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
              np.asarray(Image.open(Path(ultralytics.__file__).parent / "assets" / "bus.jpg").convert("RGB"))]
    out = []
    for i in range(count):
        image = torch.from_numpy(arrays[i % len(arrays)].copy()).permute(2, 0, 1).float()[None] / 255
        out.append(F.interpolate(image, size=(size, size), mode="area"))
    return torch.cat(out)


def build_weights(root: Path) -> dict:
    import open_clip
    from safetensors.torch import save_file
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )
    from ultralytics import YOLO

    save_file(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), root / "clip.safetensors")
    clip = {"model_name": "ViT-B-32", "pretrained": str(root / "clip.safetensors")}
    YOLO("yolov8n-seg.yaml").save(root / "yolo.pt")
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                            image_size=518, patch_size=14, out_features=["stage3", "stage6", "stage9", "stage12"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384,
                                 neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)
    DepthAnythingForDepthEstimation(config).save_pretrained(root / "depth")
    DPTImageProcessor(size={"height": 252, "width": 252}, ensure_multiple_of=14).save_pretrained(root / "depth")
    return {"caption": clip, "image_embedding": clip, "instances": {"weights": str(root / "yolo.pt")},
            "depth": {"weights": str(root / "depth"), "image_size": 252}}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (loads lazy models, allocator)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated names")
    args = parser.parse_args()
    torch.set_num_threads(2)
    images = photos(args.size, args.batch)
    captions = ["a photo of an astronaut, a cat, a cup of coffee, a rocket or a bus"] * args.batch
    mask = torch.zeros(args.batch, 1, args.size, args.size)
    mask[..., args.size // 4 : args.size // 2, :] = 1
    names = args.only.split(",") if args.only else ["caption", "image_embedding", "palette", "sketch", "instances",
                                                    "depth", "intensity", "masking"]
    print(f"CPU, {torch.get_num_threads()} threads, {args.size} px photos, fp32, best of {args.repeats}")
    print("| decomposer | ms/image batch 1 | ms/image batch 16 | 16 one by one (ms) | 16 batched (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        weights = build_weights(Path(tmp))
        for name in names:
            decomposer = get_decomposer(name, **weights.get(name, {}))

            def run(lo: int, hi: int, name: str = name, decomposer=decomposer) -> None:
                context = {}
                if name == "caption":
                    context["captions"] = captions[lo:hi]
                if name == "masking":
                    context["mask"] = mask[lo:hi]
                decomposer(images[lo:hi], **context)

            single = timed(lambda: run(0, 1), args.repeats)
            loop = timed(lambda: [run(i, i + 1) for i in range(args.batch)], 1)
            batched = timed(lambda: run(0, args.batch), args.repeats)
            print(f"| {name} | {single * 1000:.1f} | {batched * 1000 / args.batch:.1f} | {loop * 1000:.0f} | "
                  f"{batched * 1000:.0f} | {loop / batched:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
