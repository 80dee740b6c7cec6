"""Draw training loss curves (losses.csv: images_seen,loss) as a PNG, with PIL only (no matplotlib needed).

    python scripts/loss_curve.py --out docs/tiny-long-losses.png \
        "demo 36k=docs/tiny-run-losses.csv" "A: v, no weighting=runs/tiny-long-a/losses.csv" [--offset-after 36000]

Each series is LABEL=CSV. --smooth N averages N logged points (each point is already the mean of
train.log_every_steps steps). --offset NAME=IMAGES shifts a series along x (a warm-started run counts its
images from 0; give the images its starting weights had seen). Loss scales differ between loss weightings:
compare curves of the same weighting only.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def read(path: Path) -> list[tuple[int, float]]:
    rows = []
    with open(path) as handle:
        for row in csv.reader(handle):
            try:
                rows.append((int(row[0]), float(row[1])))
            except (ValueError, IndexError):
                continue  # the header, or a line cut by a crash
    if not rows:
        raise SystemExit(f"error: {path} holds no images_seen,loss rows")
    return rows


def smooth(rows: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    out = []
    for i in range(len(rows)):
        part = rows[max(0, i - window + 1): i + 1]
        out.append((rows[i][0], sum(v for _, v in part) / len(part)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="+", help="LABEL=path/to/losses.csv")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smooth", type=int, default=10)
    parser.add_argument("--offset", action="append", default=[], metavar="LABEL=IMAGES")
    parser.add_argument("--title", default="training loss (moving average)")
    parser.add_argument("--x-from", type=int, default=0, metavar="IMAGES",
                        help="start the x axis here (a long run's late pieces side by side)")
    args = parser.parse_args(argv)
    offsets = {k: int(v) for k, v in (item.split("=", 1) for item in args.offset)}
    curves = []
    for item in args.series:
        if "=" not in item:
            raise SystemExit(f"error: series {item!r} must be LABEL=CSV")
        label, path = item.split("=", 1)
        rows = smooth(read(Path(path)), max(1, args.smooth))
        curves.append((label, [(x + offsets.get(label, 0), y) for x, y in rows]))
    width, height, left, right, top, bottom = 900, 500, 70, 20, 40, 50
    curves = [(label, [(x, y) for x, y in rows if x >= args.x_from]) for label, rows in curves]
    xs = [x for _, rows in curves for x, _ in rows]
    ys = [y for _, rows in curves for _, y in rows]
    if not xs:
        raise SystemExit(f"error: no logged point at or after --x-from {args.x_from}")
    x0, x1 = args.x_from, max(xs)
    y0, y1 = 0.0, sorted(ys)[int(0.98 * (len(ys) - 1))] * 1.1  # the first steps' large losses clipped
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0 or 1) * (width - left - right),
                height - bottom - (min(y, y1) - y0) / (y1 - y0 or 1) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    step = 10 ** math.floor(math.log10(max(x1 - x0, 1) / 2))
    spacing = max(1, int(step * (2 if (x1 - x0) / step > 10 else 1)))
    for tick in range(-(-x0 // spacing) * spacing, x1 + 1, spacing):
        px, _ = to_px(tick, y0)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px - 15, height - bottom + 8), f"{tick // 1000}k", fill="black")
    for k in range(6):
        value = y0 + (y1 - y0) * k / 5
        _, py = to_px(x0, value)
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((5, py - 6), f"{value:.3g}", fill="black")
    draw.text((left, 10), args.title + "  (x: images seen)", fill="black")
    for index, (label, rows) in enumerate(curves):
        colour = COLOURS[index % len(COLOURS)]
        draw.line([to_px(x, y) for x, y in rows], fill=colour, width=2)
        draw.text((width - right - 330, top + 10 + 16 * index), f"-- {label}", fill=colour)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({len(curves)} curves)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
