"""A pipeline folder from a long run's EMA snapshot (scripts/snapshot_ema.py), to evaluate or sample it.

    python scripts/ema_pipeline.py runs/snapshot assets/demo-model runs/b116
    composer-diffusion evaluate --model runs/b116 --shards "data/scenes-heldout/scenes-*.tar" --out runs/eval-b116

OUT is a copy of BASE (its decomposers, stages and sampling defaults) whose base UNet holds the snapshot's
EMA weights (same architecture as BASE's UNet, checked by a strict load); BASE's LD-ZNet segmenter is not
carried over, since it was trained on the old base's features. OUT must not exist.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", help="a folder with ema.safetensors (snapshot_ema.py's output)")
    parser.add_argument("base", help="the pipeline folder to copy (e.g. assets/demo-model)")
    parser.add_argument("out", help="the new pipeline folder (must not exist)")
    args = parser.parse_args()
    from safetensors.torch import load_file

    from composer.models.unet import ComposerUNet
    from composer.pipelines.layout import replace_base

    snapshot, base, out = Path(args.snapshot), Path(args.base), Path(args.out)
    if not (snapshot / "ema.safetensors").is_file():
        sys.exit(f"error: {snapshot} has no ema.safetensors; make one with scripts/snapshot_ema.py")
    if out.exists():
        sys.exit(f"error: {out} exists; choose a new folder")
    ema = load_file(snapshot / "ema.safetensors")
    weights = {k[len("unet."):]: v for k, v in ema.items() if k.startswith("unet.")}
    if len(weights) != len(ema):
        others = sorted({k.split(".")[0] for k in ema if not k.startswith("unet.")})
        sys.exit(f"error: the snapshot also holds {', '.join(others)} (not a base UNet's weights alone); "
                 "this script handles base-only runs")
    unet = ComposerUNet.from_config(ComposerUNet.load_config(base / "unet"))
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)  # a clear error on a mismatch
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "unet"
        unet.save_pretrained(folder)
        staging = out.with_name(f".{out.name}-staging")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(base, staging)
        replace_base(staging, folder)
        staging.rename(out)
    print(f"{snapshot} -> {out} (a copy of {base} with the snapshot's EMA as its base UNet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
