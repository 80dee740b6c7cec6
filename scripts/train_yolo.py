"""Train the small YOLO segmentation model shipped in assets/yolo-tiny on the synthetic scenes.

    OMP_NUM_THREADS=1 python scripts/train_yolo.py --work /tmp/yolo-work --out assets/yolo-tiny --epochs 12

1. Export scenes to ultralytics' segmentation dataset format: WORK/data/images/{train,val}/*.png,
   WORK/data/labels/{train,val}/*.txt (one line per instance: class x1 y1 x2 y2 ... normalised to [0, 1]) and
   WORK/data/data.yaml naming the 10 shape classes. Polygons come from the scenes' ground-truth instance masks:
   contours traced on the mask upsampled 4x (so they follow pixel edges, not pixel centres), the parts of an
   instance split by an occluder and the hole of a ring joined into one polygon with thin cuts
   (ultralytics' ``merge_multi_segment``, as its COCO converter does). Train scenes come from ``--train-seed``,
   val scenes from ``--eval-seed``, which no training used.
2. Train ``yolov8n-seg.yaml`` (or ``--cfg``; ``--width`` narrows its width multiple) with ultralytics' own
   trainer (``model.train``) on the CPU, offline (YOLO_OFFLINE=1, a private YOLO_CONFIG_DIR with a local font).
3. Validate ``best.pt`` with ultralytics' own ``val`` on the held-out scenes and print box and mask mAP.
4. Convert it to the project's pickle-free form (``decomposers.instances.convert_yolo``) into ``--out``, and
   write the metrics beside it (training.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from composer.data.scenes import SHAPES, generate_scene  # noqa: E402

UPSAMPLE = 4


def ultralytics_offline(work: Path) -> None:
    """YOLO_OFFLINE, a writable config folder and a local TTF as its Arial.ttf (it would download one)."""
    os.environ["YOLO_OFFLINE"] = "1"
    config = work / "yolo-config"
    (config / "Ultralytics").mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config)
    font = config / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib

        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)


def instance_polygon(mask: np.ndarray) -> np.ndarray | None:
    """(N, 2) polygon (x, y in pixels, along pixel edges) covering ``mask``: every part and hole joined."""
    import cv2
    from ultralytics.data.converter import merge_multi_segment

    big = np.kron(mask.astype(np.uint8), np.ones((UPSAMPLE, UPSAMPLE), np.uint8))
    contours, _ = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    parts = [(c.reshape(-1, 2).astype(np.float64) + 0.5) / UPSAMPLE for c in contours if len(c) >= 3]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(merge_multi_segment([p.reshape(-1).tolist() for p in parts]), axis=0)


def label_lines(instances: np.ndarray, classes: np.ndarray) -> list[str]:
    size_y, size_x = instances.shape
    lines = []
    for instance in np.unique(instances):
        if instance == 0:
            continue
        mask = instances == instance
        polygon = instance_polygon(mask)
        if polygon is None:
            continue
        cls = int(np.bincount(classes[mask]).argmax()) - 1
        coords = np.clip(polygon / np.array([size_x, size_y]), 0.0, 1.0)
        lines.append(" ".join([str(cls)] + [f"{v:.5f}" for v in coords.reshape(-1)]))
    return lines


def export_split(data: Path, split: str, seed: int, num: int, size: int) -> int:
    """Scenes 0..num-1 of ``seed`` as images/SPLIT/*.png and labels/SPLIT/*.txt; returns the instance count."""
    from PIL import Image

    (data / "images" / split).mkdir(parents=True, exist_ok=True)
    (data / "labels" / split).mkdir(parents=True, exist_ok=True)
    count = 0
    for i in range(num):
        scene = generate_scene(seed, i, size)
        name = f"{seed}_{i:06d}"
        Image.fromarray((scene.image * 255).round().astype(np.uint8)).save(data / "images" / split / f"{name}.png")
        lines = label_lines(scene.instances, scene.classes)
        count += len(lines)
        (data / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return count


def export_dataset(data: Path, train_seed: int, eval_seed: int, num_train: int, num_val: int, size: int) -> Path:
    if train_seed == eval_seed:
        raise ValueError("--eval-seed must differ from --train-seed (held-out scenes)")
    shutil.rmtree(data, ignore_errors=True)
    train = export_split(data, "train", train_seed, num_train, size)
    val = export_split(data, "val", eval_seed, num_val, size)
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(SHAPES))
    (data / "data.yaml").write_text(f"path: {data.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    print(f"exported {num_train} train scenes ({train} instances, seed {train_seed}) and {num_val} val scenes "
          f"({val} instances, seed {eval_seed}) at {size} px to {data}", flush=True)
    return data / "data.yaml"


def model_yaml(cfg: str, width: float | None, work: Path) -> str:
    """``cfg``, or a copy of it whose 'n' scale has width multiple ``width``."""
    if not width:
        return cfg
    from ultralytics.nn.tasks import yaml_model_load
    from ultralytics.utils import YAML

    config = yaml_model_load(cfg)
    scale = config.get("scale") or "n"
    depth_multiple, _, max_channels = config["scales"][scale]
    config["scales"] = {scale: [depth_multiple, float(width), max_channels]}
    config.pop("yaml_file", None)
    path = work / f"yolo0{scale}-seg-w{width:g}.yaml"  # "yolo0n...": ultralytics reads the scale from the name
    YAML.save(path, config)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/yolo-work", help="dataset, ultralytics runs and its config folder")
    parser.add_argument("--out", default="assets/yolo-tiny")
    parser.add_argument("--cfg", default="yolov8n-seg.yaml")
    parser.add_argument("--width", type=float, default=0.125, help="width multiple (yolov8n: 0.25; 0 keeps the yaml's)")
    parser.add_argument("--size", type=int, default=128, help="scene size and imgsz (a multiple of 32)")
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--train-seed", type=int, default=1402)
    parser.add_argument("--eval-seed", type=int, default=1498)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr0", type=float, default=0.003, help="AdamW learning rate (ultralytics' 'auto' picks 7e-4)")
    parser.add_argument("--no-export", action="store_true", help="reuse WORK/data")
    parser.add_argument("--val-only", default=None, help="only validate this .pt or .safetensors")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error(f"--size {args.size} must be a multiple of 32")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ultralytics_offline(work)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from ultralytics import YOLO

    data_yaml = work / "data" / "data.yaml"
    if not args.no_export and not args.val_only:
        start = time.time()
        data_yaml = export_dataset(work / "data", args.train_seed, args.eval_seed, args.num_train, args.num_val,
                                   args.size)
        print(f"export took {time.time() - start:.0f} s", flush=True)

    def validate(model) -> dict:
        metrics = model.val(data=str(data_yaml), imgsz=args.size, batch=args.batch, device="cpu", workers=0,
                            plots=False, verbose=False, project=str(work / "runs"), name="val", exist_ok=True)
        return {"box_map50_95": float(metrics.box.map), "box_map50": float(metrics.box.map50),
                "mask_map50_95": float(metrics.seg.map), "mask_map50": float(metrics.seg.map50)}

    if args.val_only:
        from decomposers.instances import load_yolo_safetensors

        model = load_yolo_safetensors(args.val_only) if args.val_only.endswith(".safetensors") else YOLO(args.val_only)
        print(json.dumps(validate(model), indent=2))
        return 0

    model = YOLO(model_yaml(args.cfg, args.width, work), task="segment")
    start = time.time()
    model.train(data=str(data_yaml), epochs=args.epochs, imgsz=args.size, batch=args.batch, device="cpu", workers=0,
                optimizer="AdamW", lr0=args.lr0, plots=False, amp=False, project=str(work / "runs"), name="train", exist_ok=True, seed=0,
                deterministic=False, warmup_epochs=1.0, mosaic=0.0, degrees=0.0, scale=0.3, translate=0.1, fliplr=0.5, patience=100,
                verbose=False)
    train_seconds = time.time() - start
    best = work / "runs" / "train" / "weights" / "best.pt"
    print(f"trained in {train_seconds:.0f} s; best weights {best}", flush=True)

    from decomposers.instances import convert_yolo, load_yolo_safetensors

    out = Path(args.out)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    converted = convert_yolo(best, staging)
    shipped = converted.with_name("yolo-tiny-seg.safetensors")
    converted.replace(shipped)
    metrics = validate(load_yolo_safetensors(shipped))  # the converted, shipped weights
    record = {"script": "scripts/train_yolo.py", "args": vars(args), "train_seconds": round(train_seconds, 1),
              "imgsz": args.size, "names": list(SHAPES),
              "train_scenes": f"seed {args.train_seed}, indices 0..{args.num_train - 1}",
              "heldout": metrics | {"scenes": f"seed {args.eval_seed}, indices 0..{args.num_val - 1}"}}
    (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for file in staging.iterdir():
        file.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    print(f"held-out ({args.num_val} scenes, seed {args.eval_seed}), ultralytics val: box mAP50-95 "
          f"{metrics['box_map50_95']:.3f} (mAP50 {metrics['box_map50']:.3f}), mask mAP50-95 "
          f"{metrics['mask_map50_95']:.3f} (mAP50 {metrics['mask_map50']:.3f}); wrote {out / shipped.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
