"""How visible is the border of a region edit? A table of edits of held-out 1024 px scenes.

    python scripts/edit_seam.py --model assets/demo-model --num 4 --size 1024 --out runs/seam

For each scene (generate_scene(99, k, SIZE)) the mask is the largest object's bounding box grown by 8 %,
and the edit recolours it with the palette of the next scene. Per edit:
- outside: pixels changed outside the mask (must be 0);
- border step: the mean colour difference (0-255, mean of RGB) between each mask pixel on the border and its
  outside 4-neighbour; the same for the original at the same pairs;
- interior step: the mean difference between 4-neighbours both inside the mask, away from its border (more
  than 3 % of the side); a border that is not special has a border step close to the interior step;
- peak step: for a line along each edge of the (box) mask, the largest neighbour step met crossing it within
  2 base pixels either side, averaged along the edge; at the border and 3 reaches inside, and the original's
  at the border;
- hole PSNR: the edit vs the original inside the mask (with --conditions none: how well the fill continues
  the scene; the original is one of many right answers, so only comparisons mean something);
- seam ratio = peak step at the border / peak step inside (about 1 or below: the border is no more visible
  than any line inside the edit; a hard paste of a mismatched fill is several times 1).
Writes table.md and a picture per edit (original, edit, and a 4x crop of a border stretch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def box_mask(instances: np.ndarray, grow: float = 0.08) -> np.ndarray:
    """The largest instance's bounding box, grown by ``grow`` of the side, as a {0, 1} (H, W) mask."""
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    side = instances.shape[0]
    mask = np.zeros(instances.shape, np.float32)
    if len(ids) == 0:
        mask[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
        return mask
    ys, xs = np.nonzero(instances == ids[np.argmax(counts)])
    pad = int(grow * side)
    mask[max(0, ys.min() - pad): ys.max() + pad + 1, max(0, xs.min() - pad): xs.max() + pad + 1] = 1
    return mask


def border_pairs(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inside, outside) index pairs of 4-neighbours across the mask's border."""
    pairs = []
    h, w = mask.shape
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        ys, xs = np.nonzero(mask > 0.5)
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        ys, xs, ny, nx = ys[ok], xs[ok], ny[ok], nx[ok]
        out = mask[ny, nx] < 0.5
        pairs.append(((ys[out], xs[out]), (ny[out], nx[out])))
    return pairs


def step(image: np.ndarray, pairs) -> float:
    diffs = [np.abs(image[a] - image[b]).mean(axis=-1) for a, b in pairs if len(a[0])]
    return float(np.concatenate(diffs).mean() * 255) if diffs else float("nan")


def interior_step(image: np.ndarray, mask: np.ndarray, margin: int) -> float:
    import cv2

    inner = cv2.distanceTransform((mask > 0.5).astype(np.uint8), cv2.DIST_L2, 5) > margin
    dx = np.abs(image[:, 1:] - image[:, :-1]).mean(-1)[inner[:, 1:] & inner[:, :-1]]
    dy = np.abs(image[1:] - image[:-1]).mean(-1)[inner[1:] & inner[:-1]]
    return float(np.concatenate([dx, dy]).mean() * 255)


def peak_step(image: np.ndarray, mask: np.ndarray, offset: int, reach: int) -> float:
    """The mean over the box mask's four edges of the largest neighbour step (0-255) met when crossing a line
    ``offset`` pixels inside the edge, within ``reach`` pixels either side of it (offset 0: the border itself).
    A seam is a peak at the border that the same measure a little further inside does not show."""
    ys, xs = np.nonzero(mask > 0.5)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = mask.shape
    lum = image.mean(-1) * 255
    peaks = []
    for line, axis, inward in ((y0, 0, 1), (y1, 0, -1), (x0, 1, 1), (x1, 1, -1)):
        centre = line + inward * offset
        lo, hi = max(0, centre - reach), min((h if axis == 0 else w) - 1, centre + reach)
        if hi - lo < 2 or (line == 0 or line == (h if axis == 0 else w) - 1) and offset == 0:
            continue  # an edge on the image's border has no outside
        band = lum[lo:hi + 1, x0:x1 + 1] if axis == 0 else lum[y0:y1 + 1, lo:hi + 1].T
        peaks.append(np.abs(np.diff(band, axis=0)).max(axis=0).mean())
    return float(np.mean(peaks)) if peaks else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/demo-model")
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--feather", type=float, default=None, help="edit_feather (base pixels; default: the model's)")
    parser.add_argument("--upsampler-steps", type=int, default=None)
    parser.add_argument("--resample", type=int, default=1, help="edit_resample (RePaint, in the base)")
    parser.add_argument("--conditions", default="palette,sketch",
                        help="what the edit is given: palette (of another scene), sketch (of the original), none")
    parser.add_argument("--out", default="runs/seam")
    args = parser.parse_args(argv)

    from composer.data.scenes import generate_scene
    from composer.pipelines import ComposerPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = ComposerPipeline.from_pretrained(args.model)
    rows = []
    for k in range(args.num):
        scene, donor = generate_scene(args.seed, k, args.size), generate_scene(args.seed, k + 1000, args.size)
        mask = box_mask(scene.instances)
        original = scene.image
        extra = {"edit_resample": args.resample, **({} if args.feather is None else {"edit_feather": args.feather})}
        given = {"palette": donor.image, "sketch": original}
        names = [n for n in args.conditions.split(",") if n and n != "none"]
        edited = pipe(images={n: given[n] for n in names}, image=original, mask=mask,
                      size=args.size, generator=torch.Generator().manual_seed(k), output_type="np", progress=False,
                      upsampler_steps=args.upsampler_steps, **extra).images[0]
        pairs = border_pairs(mask)
        margin = max(2, int(0.03 * args.size))
        row = {"scene": k, "outside": int((np.abs(edited - original).max(-1) > 0)[mask < 0.5].sum()),
               "border_step": step(edited, pairs), "border_step_original": step(original, pairs),
               "interior_step": interior_step(edited, mask, margin)}
        reach = max(2, args.size // 32)  # 2 base pixels at 1024 px
        row["peak_border"] = peak_step(edited, mask, 0, reach)
        row["peak_inside"] = peak_step(edited, mask, 3 * reach, reach)
        row["peak_border_original"] = peak_step(original, mask, 0, reach)
        row["seam_ratio"] = row["peak_border"] / max(row["peak_inside"], 1e-6)
        hole = mask > 0.5
        row["hole_psnr"] = float(-10 * np.log10(max(np.mean((edited[hole] - original[hole]) ** 2), 1e-10)))
        rows.append(row)
        ys, xs = np.nonzero(mask)
        y0 = int(ys.min())
        x0 = int(np.clip(xs.mean() - args.size // 16, 0, args.size - args.size // 8))
        top = max(0, y0 - args.size // 32)
        crop = edited[top: top + args.size // 16, x0: x0 + args.size // 8]
        crop = np.kron(crop, np.ones((4, 4, 1)))
        if k < 8:
            Image.fromarray((np.clip(np.concatenate([original, edited], 1), 0, 1) * 255).astype(np.uint8)).save(
                out / f"edit-{k}.png")
            Image.fromarray((np.clip(crop, 0, 1) * 255).astype(np.uint8)).save(out / f"edit-{k}-border.png")
        print(json.dumps(row), flush=True)
    keys = ["outside", "border_step", "border_step_original", "interior_step", "peak_border", "peak_inside",
            "peak_border_original", "seam_ratio", "hole_psnr"]
    mean = {key: float(np.nanmean([r[key] for r in rows])) for key in keys}
    lines = ["| scene | outside px changed | border step | original's | interior step | peak step at border | "
             "peak step inside | original's peak at border | seam ratio (peak border / inside) | hole PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows + [{"scene": "mean", **mean}]:
        lines.append(f"| {r['scene']} | {r['outside']:.0f} | {r['border_step']:.2f} | {r['border_step_original']:.2f} | "
                     f"{r['interior_step']:.2f} | {r['peak_border']:.2f} | {r['peak_inside']:.2f} | "
                     f"{r['peak_border_original']:.2f} | {r['seam_ratio']:.2f} | {r['hole_psnr']:.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "mean": mean}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
