"""LD-ZNet on held-out scenes: zero-shot masks vs the image-only network vs the network on diffusion features,
and an ablation of the diffusion features over noise level and UNet block.

    OMP_NUM_THREADS=1 python scripts/ldznet_eval.py [--model assets/demo-model] [--images 2000] [--scenes 256]
        [--timesteps 100 400 700] [--blocks mid_block up_blocks.0] [--out runs/ldznet-eval] [--extra DIR ...]

1. Trains every variant with the preset configs/train/ldznet-tiny.yaml (same seed, same scenes, same number of
   images ``--images``, same schedule), each into OUT/<variant>: the image-only network (the paper's baseline: the
   same network with zeros for the features) and one network per (block, timestep). A variant whose run already
   finished is reused; an interrupted one is resumed.
2. Scores each on the held-out scenes 0 .. --scenes-1 of seed 99 (never trained on), one unique-referring phrase
   per object (composer.ldznet.phrases): mIoU (mean over phrases of the IoU at threshold 0.5) and oIoU (pooled).
3. When composer.ldznet.zeroshot exists: the zero-shot mask of each phrase (the phrase as the caption against no
   caption, its default levels, draws and threshold), on the same phrases (--zeroshot-scenes of them).
4. Prints the markdown tables and writes OUT/results.json. ``--extra DIR``: also score trained components (e.g.
   runs/ldznet-tiny/ldznet, a longer run), listed under their folder name.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "train" / "ldznet-tiny.yaml"
PRESET_BLOCK, PRESET_TIMESTEP = "mid_block", 400  # the preset's features


def variant_name(image_only: bool, block: str | None = None, timestep: int | None = None) -> str:
    return "image-only" if image_only else f"{block.replace('.', '')}-t{timestep}"


def train_variant(model: str, out: Path, images: int, image_only: bool, block: str, timestep: int,
                  overrides: list[str]) -> tuple[dict, bool]:
    """Train (or reuse, or resume) one variant; returns its run summary and whether it was trained now."""
    from composer.config import load_config
    from composer.ldznet.train import SUMMARY_FILE, train_ldznet

    summary_path = out / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("images_seen") == images and (out / "ldznet").is_dir():
            print(f"{out.name}: reusing the finished run ({summary.get('seconds')} s)", flush=True)
            return summary, False
    cfg = load_config([PRESET], [f"output_dir={out}", f"train.ldznet.base={model}", f"train.total_images={images}",
                                 f"train.ldznet.image_only={str(image_only).lower()}", f"train.ldznet.blocks=[{block}]",
                                 f"train.ldznet.timesteps=[{timestep}]", "train.ldznet.validation_scenes=0",
                                 "train.warmup_images=500", "train.checkpoint_every_images=1000", "train.log_every_steps=25",
                                 *overrides])
    cfg.train.resume = "auto" if (out / "checkpoints").is_dir() else None
    started = time.time()
    summary = train_ldznet(cfg)
    print(f"{out.name}: trained {images} images in {time.time() - started:.0f} s", flush=True)
    return summary, True


def score_component(model: str, component: Path, samples) -> dict:
    from composer.ldznet.metrics import evaluate_masks
    from composer.ldznet.segmenter import load_segmenter

    segmenter = load_segmenter(model, component=component, device="cpu", precision="auto")
    started = time.time()
    scores = evaluate_masks(segmenter.predict, samples)
    scores["seconds"] = round(time.time() - started, 1)
    return scores


def score_foreground(samples) -> dict:
    """A reference that knows where the objects are but not which one: every object's pixels as the mask."""
    from composer.data.scenes import generate_scene
    from composer.ldznet.metrics import evaluate_masks

    cache: dict[tuple[int, int], torch.Tensor] = {}
    masks = []
    for sample in samples:
        key = (sample.seed, sample.index)
        if key not in cache:
            cache[key] = torch.from_numpy(generate_scene(*key, sample.image.shape[-1]).instances > 0).float()[None]
        masks.append(cache[key])
    pending = iter(masks)  # evaluate_masks asks for the samples in order
    return evaluate_masks(lambda images, phrases: torch.stack([next(pending) for _ in phrases]), samples)


def score_zeroshot(model: str, samples) -> dict | None:
    """The zero-shot masks (part A's composer.ldznet.zeroshot) of the same phrases, one batched call per scene."""
    try:
        from composer.ldznet.zeroshot import phrase_maps, threshold_map
    except ImportError:
        return None
    from composer.ldznet.metrics import mask_ious
    from composer.pipelines import ComposerPipeline

    pipe = ComposerPipeline.from_pretrained(model)
    started = time.time()
    by_scene: dict[tuple[int, int], list] = {}
    for sample in samples:
        by_scene.setdefault((sample.seed, sample.index), []).append(sample)
    ious, intersections, unions = [], [], []
    for (seed, index), group in by_scene.items():
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        maps = phrase_maps(pipe, group[0].image[None], [s.phrase for s in group], None, generator=generator,
                           precision="auto")
        for sample, values in zip(group, maps):
            iou, intersection, union = mask_ious(threshold_map(values).float(), sample.mask[None])
            ious.append(float(iou))
            intersections.append(float(intersection))
            unions.append(float(union))
    return {"miou": sum(ious) / len(ious), "oiou": sum(intersections) / max(sum(unions), 1.0), "count": len(ious),
            "seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/demo-model", help="the pipeline folder whose base is read")
    parser.add_argument("--images", type=int, default=2000, help="training images per variant (default 2000)")
    parser.add_argument("--scenes", type=int, default=256, help="held-out scenes of seed 99 (default 256)")
    parser.add_argument("--zeroshot-scenes", type=int, default=None,
                        help="scenes for the zero-shot row (default: --scenes; it costs ~(phrases + 1) x 6 UNet passes)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 400, 700])
    parser.add_argument("--blocks", nargs="+", default=["mid_block", "up_blocks.0"])
    parser.add_argument("--out", default="runs/ldznet-eval", help="one run folder per variant, and results.json")
    parser.add_argument("--extra", nargs="*", default=[], help="trained component folders to score as well")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant's training (e.g. train.lr=5e-4)")
    parser.add_argument("--no-zeroshot", action="store_true", help="skip the zero-shot row")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from composer.ldznet.metrics import heldout_samples

    out = Path(args.out)
    samples = heldout_samples(99, args.scenes, 64)
    print(f"{len(samples)} phrases on {args.scenes} held-out scenes (seed 99)", flush=True)
    # 1-2. Train and score every variant
    variants = [(True, args.blocks[0], args.timesteps[0])] + [(False, b, t) for b in args.blocks for t in args.timesteps]
    results: dict[str, dict] = {}
    earlier = previous_results(out, args)
    for image_only, block, timestep in variants:
        name = variant_name(image_only, block, timestep)
        summary, trained = train_variant(args.model, out / name, args.images, image_only, block, timestep,
                                         args.overrides)
        scores = earlier.get(name) if not trained and name in earlier else score_component(
            args.model, out / name / "ldznet", samples)
        results[name] = {**scores, "train_seconds": summary.get("seconds"), "parameters": summary.get("parameters"),
                         "block": None if image_only else block, "timestep": None if image_only else timestep}
        print(f"{name}: mIoU {scores['miou']:.3f} oIoU {scores['oiou']:.3f}", flush=True)
        write_results(out, args, results)
    for folder in args.extra:
        results[Path(folder).parent.name or folder] = score_component(args.model, Path(folder), samples)
    results["foreground"] = score_foreground(samples)
    # 3. Zero-shot
    if args.no_zeroshot and "zero-shot" in earlier:
        results["zero-shot"] = earlier["zero-shot"]
    elif not args.no_zeroshot:
        count = args.zeroshot_scenes if args.zeroshot_scenes is not None else args.scenes
        zeroshot = score_zeroshot(args.model, [s for s in samples if s.index < count])
        if zeroshot is None:
            print("composer.ldznet.zeroshot is not available: no zero-shot row", flush=True)
        else:
            results["zero-shot"] = zeroshot
    write_results(out, args, results)
    # 4. Tables
    print(tables(results, args), flush=True)
    return 0


def previous_results(out: Path, args: argparse.Namespace) -> dict:
    """Scores of an earlier invocation on the same held-out scenes (reused for runs that were not retrained)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    same = saved.get("settings", {}).get("scenes") == args.scenes and saved["settings"].get("model") == args.model
    return saved.get("results", {}) if same else {}


def write_results(out: Path, args: argparse.Namespace, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "images": args.images, "scenes": args.scenes, "timesteps": args.timesteps,
                "blocks": args.blocks, "overrides": args.overrides}
    path = out / "results.json"
    path.with_suffix(".tmp").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    path.with_suffix(".tmp").replace(path)


def tables(results: dict, args: argparse.Namespace) -> str:
    def row(label: str, r: dict) -> str:
        return f"| {label} | {r['miou']:.3f} | {r['oiou']:.3f} | {r['count']} |"

    # (c) is the preset's variant (the paper's choice: the middle block at t = 400), chosen before any result
    chosen = results.get(variant_name(False, PRESET_BLOCK, PRESET_TIMESTEP))
    best = max((r for r in results.values() if r.get("block")), key=lambda r: r["miou"], default=None)
    lines = [f"Held-out scenes of seed 99 ({args.scenes}), one unique-referring phrase per object; each network "
             f"trained on {args.images} images.", "", "| method | mIoU | oIoU | phrases |", "|---|---|---|---|"]
    if "zero-shot" in results:
        lines.append(row("(a) zero-shot map (phrase vs no caption)", results["zero-shot"]))
    lines.append(row("(b) image only (same network, zero features)", results["image-only"]))
    if chosen is not None:
        lines.append(row(f"(c) diffusion features ({PRESET_BLOCK}, t = {PRESET_TIMESTEP})", chosen))
    if best is not None and best is not chosen:
        lines.append(row(f"best ablation cell ({best['block']}, t = {best['timestep']}; chosen on these scenes)", best))
    if "foreground" in results:
        lines.append(row("reference: every object's pixels (knows where objects are, not which)", results["foreground"]))
    for name, r in results.items():
        if name not in ("zero-shot", "image-only", "foreground") and not r.get("block"):
            lines.append(row(f"{name} (a trained component, --extra)", r))
    lines += ["", "Ablation, mIoU (oIoU):", "",
              "| block | " + " | ".join(f"t = {t}" for t in args.timesteps) + " |",
              "|---|" + "---|" * len(args.timesteps)]
    for block in args.blocks:
        cells = []
        for t in args.timesteps:
            r = results.get(variant_name(False, block, t))
            cells.append(f"{r['miou']:.3f} ({r['oiou']:.3f})" if r else "-")
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
