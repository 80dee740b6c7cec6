"""Train the small depth model shipped in assets/depth-tiny on the synthetic scenes' ground-truth depth.

    OMP_NUM_THREADS=1 python scripts/train_depth.py --out assets/depth-tiny --steps 1000

The model is a Depth Anything config (a 4-layer DINOv2 backbone of width 96 with 8 px patches, the DPT neck
and the relative-depth head) built with transformers and saved with ``save_pretrained`` together with its
``DPTImageProcessor``, so ``decomposers.depth`` loads it through ``AutoModelForDepthEstimation`` like
Depth-Anything-V2. Like relative Depth Anything it predicts *disparity* (larger = nearer): the target is
``1 - depth`` of the scenes (whose depth is in [0, 1], larger = farther), learnt with a scale-and-shift-
invariant L1 loss (MiDaS) plus a smaller direct L1 term that keeps the output in range.

Training scenes come from ``--train-seed``; the held-out report uses 256 scenes from ``--eval-seed``, which no
training used, and runs the *saved* folder through the project's DepthDecomposer. It prints Spearman (per image,
over pixels, averaged) and AbsRel after median scaling, for the model and for a floor-prior baseline (depth
= image row, no model), and writes the model's map of scikit-image's astronaut to ``--photo``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from composer.data.scenes import generate_scene  # noqa: E402

MEAN = STD = (0.5, 0.5, 0.5)


def build_model(size: int, width: int, layers: int, patch: int):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
                            intermediate_size=4 * width, image_size=size, patch_size=patch,
                            out_features=[f"stage{i}" for i in range(1, layers + 1)][-4:], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=patch, reassemble_hidden_size=width,
                                 neck_hidden_sizes=[width // 4, width // 2, width, width], fusion_hidden_size=width // 2,
                                 head_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
                                 depth_estimation_type="relative")
    return DepthAnythingForDepthEstimation(config)


def build_processor(size: int, patch: int):
    from transformers import DPTImageProcessor

    return DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=False, ensure_multiple_of=patch,
                             do_rescale=True, do_normalize=True, image_mean=list(MEAN), image_std=list(STD))


def scene_pool(seed: int, num: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, 3, S, S) uint8 images and (num, 1, S, S) float16 depth of scenes 0..num-1 of ``seed``."""
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)
    depth = torch.empty(num, 1, size, size, dtype=torch.float16)
    for i in range(num):
        scene = generate_scene(seed, i, size)
        images[i] = torch.from_numpy(np.round(scene.image * 255).astype(np.uint8)).permute(2, 0, 1)
        depth[i, 0] = torch.from_numpy(scene.depth)
    return images, depth


def ssi_align(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``pred`` (B, N) scaled and shifted per row by least squares onto ``target``."""
    p_mean, t_mean = pred.mean(1, keepdim=True), target.mean(1, keepdim=True)
    pc, tc = pred - p_mean, target - t_mean
    scale = (pc * tc).sum(1, keepdim=True) / (pc * pc).sum(1, keepdim=True).clamp_min(1e-8)
    return scale * pc + t_mean


def depth_loss(disparity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, target = disparity.flatten(1).float(), target.flatten(1).float()
    return F.l1_loss(ssi_align(pred, target), target) + 0.5 * F.l1_loss(pred, target)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flips (applied by the caller to the target too) are not here: brightness, contrast,
    saturation and a little noise, so the model leans on shapes more than on the scenes' exact colours."""
    b = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    grey = images.mean(1, keepdim=True)
    images = grey + (images - grey) * (0.5 + rand(b, 1, 1, 1))  # saturation 0.5-1.5
    mean = images.mean((1, 2, 3), keepdim=True)
    images = mean + (images - mean) * (0.7 + 0.6 * rand(b, 1, 1, 1))  # contrast
    images = images + 0.2 * (rand(b, 1, 1, 1) - 0.5)  # brightness
    images = images + 0.02 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def save_folder(model, processor, out: Path, record: dict) -> None:
    """save_pretrained into a temporary sibling, then swap it in (a failed save leaves the old folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a shipped asset is world-readable
        for file in staging.iterdir():
            file.chmod(0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.replace(old)
            staging.replace(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a.ravel(), b.ravel()).statistic
    return float(value) if np.isfinite(value) else 0.0


def abs_rel(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean |s * pred - gt| / gt with s = median(gt) / median(pred) (median scaling)."""
    pred = np.maximum(pred, 1e-6)
    scaled = pred * (np.median(gt) / np.median(pred))
    return float(np.mean(np.abs(scaled - gt) / gt))


@torch.no_grad()
def evaluate(folder: Path, seed: int, num: int, size: int) -> dict:
    """Held-out scores of the saved folder, loaded by the project's DepthDecomposer."""
    from decomposers.depth import DepthDecomposer

    decomposer = DepthDecomposer(weights=str(folder))
    model = decomposer.model()
    images, depth = scene_pool(seed, num, size)
    x = images.float() / 255
    rows = torch.linspace(1, 0, size).view(1, 1, size, 1).expand(1, 1, size, size)  # top = far
    scores = {k: [] for k in ("spearman", "absrel", "absrel_normalised", "baseline_spearman", "baseline_absrel")}
    for start in range(0, num, 32):
        batch = x[start:start + 32]
        normalised = decomposer.predict(batch).numpy()  # what the decomposer hands the model: [0, 1], far = 1
        pixel_values = (F.interpolate(batch, size=(decomposer.image_size,) * 2, mode="bicubic", align_corners=False,
                                      antialias=True).clamp(0, 1) - decomposer.mean) / decomposer.std
        raw = model(pixel_values=pixel_values).predicted_depth[:, None]
        raw = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
        raw_depth = (1.0 - raw).numpy()  # the model predicts 1 - depth
        for i in range(len(batch)):
            gt = depth[start + i, 0].float().numpy()
            scores["spearman"].append(spearman(normalised[i, 0], gt))
            scores["absrel"].append(abs_rel(raw_depth[i, 0], gt))
            scores["absrel_normalised"].append(abs_rel(normalised[i, 0] + 1e-3, gt))
            scores["baseline_spearman"].append(spearman(rows[0, 0].numpy(), gt))
            scores["baseline_absrel"].append(abs_rel(rows[0, 0].numpy() + 1e-3, gt))
    return {k: float(np.mean(v)) for k, v in scores.items()} | {"num": num, "seed": seed, "size": size}


@torch.no_grad()
def photo_map(folder: Path, path: Path) -> None:
    """scikit-image's astronaut beside the model's depth of it (near bright), as a PNG."""
    from PIL import Image
    from skimage import data

    from decomposers.depth import DepthDecomposer

    decomposer = DepthDecomposer(weights=str(folder))
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    photo = F.interpolate(photo, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
    depth = decomposer.predict(photo)
    panel = torch.cat([photo[0], decomposer.visualize(depth)[0]], dim=2)
    array = (panel.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(array).save(partial, format="PNG")
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="assets/depth-tiny")
    parser.add_argument("--size", type=int, default=96, help="scene size and model input side (a multiple of --patch)")
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pool", type=int, default=8000, help="training scenes (indices 0..pool-1 of --train-seed)")
    parser.add_argument("--train-seed", type=int, default=1401)
    parser.add_argument("--eval-seed", type=int, default=1499, help="held-out scenes: a seed no training used")
    parser.add_argument("--eval-num", type=int, default=256)
    parser.add_argument("--photo", default="docs/depth-photo.png")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the folder at --out")
    args = parser.parse_args(argv)
    if args.size % args.patch:
        parser.error(f"--size {args.size} must be a multiple of --patch {args.patch}")
    if args.train_seed == args.eval_seed:
        parser.error("--eval-seed must differ from --train-seed (held-out scenes)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)

    if not args.eval_only:
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        start = time.time()
        images, depth = scene_pool(args.train_seed, args.pool, args.size)
        print(f"{args.pool} training scenes of seed {args.train_seed} at {args.size} px in {time.time() - start:.0f} s",
              flush=True)
        model = build_model(args.size, args.width, args.layers, args.patch)
        processor = build_processor(args.size, args.patch)
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {params / 1e6:.2f} M parameters", flush=True)
        optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        warmup = max(1, args.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / args.steps))))
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        model.train()
        start, running = time.time(), 0.0
        for step in range(1, args.steps + 1):
            index = torch.randint(0, args.pool, (args.batch,), generator=generator)
            x = augment(images[index].float() / 255, generator)
            target = 1.0 - depth[index].float()  # disparity-like: near = large
            flip = torch.rand(args.batch, generator=generator) < 0.5
            x[flip], target[flip] = x[flip].flip(-1), target[flip].flip(-1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                predicted = model(pixel_values=(x - mean) / std).predicted_depth
            loss = depth_loss(predicted.float(), target[:, 0])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            running += loss.item()
            if step % 100 == 0 or step == args.steps:
                elapsed = time.time() - start
                print(f"step {step}/{args.steps} loss {running / (100 if step % 100 == 0 else step % 100):.4f} "
                      f"{elapsed:.0f} s ({step * args.batch / elapsed:.1f} images/s)", flush=True)
                running = 0.0
        train_seconds = time.time() - start
        model.eval()
        record = {"script": "scripts/train_depth.py", "args": vars(args), "parameters": params,
                  "train_seconds": round(train_seconds, 1), "target": "1 - scene depth (disparity-like)",
                  "train_scenes": f"seed {args.train_seed}, indices 0..{args.pool - 1}"}
        save_folder(model, processor, out, record)
        print(f"saved {out} after {train_seconds:.0f} s of training", flush=True)

    metrics = evaluate(out, args.eval_seed, args.eval_num, args.size)
    print(f"held-out ({metrics['num']} scenes, seed {metrics['seed']}): Spearman {metrics['spearman']:.3f}, "
          f"AbsRel {metrics['absrel']:.3f} (median-scaled raw output; {metrics['absrel_normalised']:.3f} on the "
          f"decomposer's normalised map); floor-prior baseline (depth = row): Spearman "
          f"{metrics['baseline_spearman']:.3f}, AbsRel {metrics['baseline_absrel']:.3f}", flush=True)
    record_path = out / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["heldout"] = metrics
    partial = record_path.with_name(".training.json.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(record_path)
    if args.photo:
        photo_map(out, Path(args.photo))
        print(f"wrote {args.photo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
