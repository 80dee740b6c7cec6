"""Keep a long run's EMA weights across sessions: the newest checkpoint's EMA, in fp16, into a small folder
that `train.init_from` accepts (ema.safetensors + training_state.json), written atomically over the old copy.

    python scripts/snapshot_ema.py runs/tiny-long-b runs/snapshot

fp16 halves the file (7.2 M parameters: 14 MB); the run continues from it with a fresh optimizer (warm start).
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
    parser.add_argument("run", help="a run's output_dir (its checkpoints/ folder is read)")
    parser.add_argument("out", help="the folder to write (replaced atomically)")
    args = parser.parse_args()
    from safetensors.torch import load_file, save_file

    from composer.pipelines.layout import swap_in
    from composer.train.checkpoint import STATE_FILE, CheckpointStore

    newest = CheckpointStore(Path(args.run) / "checkpoints").newest_verified()  # checked against its manifest
    if newest is None or not (newest / "ema.safetensors").is_file():
        sys.exit(f"error: no verified checkpoint with ema.safetensors under {args.run}/checkpoints")
    ema = load_file(newest / "ema.safetensors")
    half = {k: v.half() if v.is_floating_point() else v for k, v in ema.items()}
    worst = max(float((half[k].float() - v.float()).abs().max()) for k, v in ema.items() if v.is_floating_point())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)
    for extra in out.glob("*") if out.is_dir() else []:  # keep what else the folder holds (its README)
        if extra.name not in ("ema.safetensors", STATE_FILE):
            shutil.copy2(extra, staging / extra.name)
    save_file(half, str(staging / "ema.safetensors"))
    shutil.copy2(newest / STATE_FILE, staging / STATE_FILE)
    swap_in(staging, out)  # fsynced; a crash between its renames is undone by layout.recover
    size = (out / "ema.safetensors").stat().st_size / 2**20
    print(f"{newest.name} -> {out} (fp16, {size:.1f} MiB, largest rounding error {worst:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
