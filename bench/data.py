"""Data throughput: scenes rendered per second by size, and loader images per second.

    python bench/data.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# bench/decomposers.py is named like the package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from composer.config import load_config  # noqa: E402
from composer.data.loader import make_loader  # noqa: E402
from composer.data.scenes import generate_scene  # noqa: E402
from composer.data.shards import write_scene_shards  # noqa: E402


def scenes_per_second(size: int, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        generate_scene(0, count, size)
        count += 1
    return count / (time.perf_counter() - start)


def loader_images_per_second(shards: str, resolution: int, workers: int, extras: list[str]) -> float:
    cfg = load_config([], [f"data.resolution={resolution}", f"data.num_workers={workers}", "data.batch_size=32"])
    cfg.data.shards = [shards]
    cfg.data.extras = extras
    loader = make_loader(cfg.data, seed=0, epochs=1)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["key"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--num", type=int, default=1024, help="scenes per loader measurement")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| scene size (px) | scenes/s |")
    print("|---|---|")
    for size in (64, 256, 1024):
        print(f"| {size} | {scenes_per_second(size, args.seconds):.1f} |")
    print()
    print("| loader: shard px -> resolution | workers | extras | images/s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (64, 256):
            out = f"{tmp}/s{size}"
            write_scene_shards(out, max(args.num if size == 64 else args.num // 4, 128), size, shard_size=64, progress=False)
            for workers in (0, 2):
                for extras in ([], ["instances", "classes", "depth"]):
                    rate = loader_images_per_second(f"{out}/scenes-*.tar", size, workers, extras)
                    print(f"| {size} -> {size} | {workers} | {','.join(extras) or '-'} | {rate:.0f} |")


if __name__ == "__main__":
    main()
