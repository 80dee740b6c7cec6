"""Model cost on the CPU: parameters, FLOPs per forward, ms per training and sampling step, FLOP/s against
the measured bf16 matmul peak, and one batched guided step against two separate forwards.

    python bench/model.py [--batch 16] [--paper-batch 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from composer.conditions import Conditions, ConditionSpec  # noqa: E402
from composer.diffusion.guidance import guided_prediction  # noqa: E402
from composer.models.config import count_parameters, model_kwargs  # noqa: E402
from composer.models.unet import ComposerUNet  # noqa: E402


def specs(word_dim: int, embed: int) -> dict[str, ConditionSpec]:
    return {
        "caption": ConditionSpec("caption", ("global", "tokens"), embed, token_dim=word_dim, num_tokens=77),
        "image_embedding": ConditionSpec("image_embedding", ("global",), embed),
        "palette": ConditionSpec("palette", ("global",), 275),
        **{n: ConditionSpec(n, ("local",), c) for n, c in
           {"sketch": 1, "instances": 5, "depth": 1, "intensity": 1, "masking": 4}.items()},
    }


def conditions(batch: int, word_dim: int, embed: int) -> Conditions:
    return Conditions({
        "caption": {"sentence": torch.randn(batch, embed), "words": torch.randn(batch, 77, word_dim),
                    "words_mask": torch.ones(batch, 77, dtype=torch.bool)},
        "image_embedding": torch.randn(batch, embed), "palette": torch.rand(batch, 275),
        **{n: torch.rand(batch, c, 64, 64) for n, c in {"sketch": 1, "instances": 5, "depth": 1, "intensity": 1,
                                                         "masking": 4}.items()},
    })


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak() -> float:
    a, b = torch.randn(2048, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
    seconds = best_time(lambda: a @ b, 5)
    return 2 * 2048**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--paper-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    peak = matmul_peak()
    print(f"bf16 matmul peak measured here: {peak / 1e9:.0f} GFLOP/s (2048^3, 2 threads)\n")
    print("| preset | params (M) | batch | GFLOP/forward | train step ms (bf16) | sampling step ms (bf16, guided) "
          "| achieved GFLOP/s (train) | of peak | guided: 1 batched fwd ms | 2 separate fwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [("tiny", args.batch, 128, 128)] + ([] if args.skip_paper else [("paper", args.paper_batch, 768, 768)])
    for preset, batch, word_dim, embed in rows:
        measure(preset, batch, word_dim, embed, args.repeats if preset == "tiny" else 1, peak)


def measure(preset: str, batch: int, word_dim: int, embed: int, repeats: int, peak: float) -> None:
    torch.manual_seed(0)
    model = ComposerUNet(**model_kwargs(preset, specs=specs(word_dim, embed)))
    c = conditions(batch, word_dim, embed)
    x, t = torch.randn(batch, 3, 64, 64), torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, c)
    flops = counter.get_total_flops()
    parameters = count_parameters(model)
    # AdamW in fp32 needs weights + grads + 2 moments = 16 bytes per parameter; skip what cannot fit here
    trainable_here = parameters * 16 < 0.7 * 24 * 2**30
    train = float("nan")
    if trainable_here:
        optimizer = torch.optim.AdamW(model.parameters(), 1e-5)

        def train_step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, t, c).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train = best_time(train_step, repeats)
        del optimizer
    model.eval()
    empty = c.subset([])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sample = best_time(lambda: guided_prediction(model, x, t, c, 3.0), repeats)
        separate = best_time(lambda: (model(x, t, empty), model(x, t, c)), repeats)
        forward = best_time(lambda: model(x, t, c), repeats)
    achieved = (3 * flops / train) if trainable_here else (flops / forward)
    label = "train" if trainable_here else "fwd only"
    train_text = f"{train * 1000:.0f}" if trainable_here else "n/a (AdamW state > RAM)"
    print(f"| {preset} | {parameters / 1e6:.1f} | {batch} | {flops / 1e9:.1f} | {train_text} | {sample * 1000:.0f} | "
          f"{achieved / 1e9:.0f} ({label}) | {achieved / peak:.0%} | {sample * 1000:.0f} | {separate * 1000:.0f} |",
          flush=True)

if __name__ == "__main__":
    main()
