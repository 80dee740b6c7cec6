"""Slot encoder cost: forward + backward time of the slots decomposer per configuration and precision.

    python bench/slots.py [--batch 16] [--repeats 3]

Prints one row per configuration: parameters, fp32 and bf16 milliseconds per training step (forward with
sampled initial slots and backward of a dummy loss), and inference milliseconds for `encode` (masks included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# bench/decomposers.py is named like the package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from decomposers.slots import SlotsDecomposer  # noqa: E402

CONFIGS = {
    "default (64 px -> 32, 64 ch, 4 layers)": {},
    "feature 16": {"feature_resolution": 16},
    "48 ch, feature 16": {"backbone_channels": 48, "feature_resolution": 16},
    "kernel 3, feature 16": {"kernel_size": 3, "feature_resolution": 16},
    "slot_dim 128": {"slot_dim": 128},
    "5 iterations": {"iterations": 5},
}


def milliseconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = torch.rand(args.batch, 3, 64, 64)
    print(f"batch {args.batch}, 64 px, {torch.get_num_threads()} threads")
    print(f"{'configuration':<40} {'params':>8} {'train fp32 ms':>14} {'train bf16 ms':>14} {'encode ms':>10}")
    for label, options in CONFIGS.items():
        encoder = SlotsDecomposer(**options)
        params = sum(p.numel() for p in encoder.parameters())

        def step(dtype: torch.dtype, encoder: SlotsDecomposer = encoder) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                slots = encoder(images, training=True, generator=torch.Generator().manual_seed(0))
            slots.float().square().mean().backward()
            encoder.zero_grad(set_to_none=True)

        def encode(encoder: SlotsDecomposer = encoder) -> None:
            with torch.no_grad():
                encoder.encode(images)

        fp32 = milliseconds(lambda: step(torch.float32), args.repeats)
        bf16 = milliseconds(lambda: step(torch.bfloat16), args.repeats)
        print(f"{label:<40} {params:>8} {fp32:>14.0f} {bf16:>14.0f} {milliseconds(encode, args.repeats):>10.0f}")


if __name__ == "__main__":
    main()
