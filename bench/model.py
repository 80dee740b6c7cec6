"""Model cost on the CPU: the training step as a user of plain diffusers would run it beside ours, FLOP/s
against the measured matmul peak (bf16 where the CPU runs it natively, else fp32), the sampling step, and (with shards) the end-to-end training rate.

    python bench/model.py [--batch 16] [--repeats 5] [--compile] [--end-to-end] [--paper]

Rows of the training table (fwd + bwd + clip + AdamW at the same batch, best of --repeats):
- diffusers' UNet2DConditionModel with the tiny preset's blocks (in 3 channels, the same widths, levels,
  heads and cross-attention width, a context of the same 94 tokens), fp32, NCHW, AdamW's default loop:
  what a user would write instead of this project;
- the same in bf16 autocast;
- ComposerUNet (adapters included) as wave 1 trained it: bf16, NCHW, AdamW's loop;
- ComposerUNet as `train` runs it by default: bf16, NCHW, fused AdamW; then channels_last, without and with
  NHWCGroupNorm (what train.memory_format=channels_last runs); with --compile
  also torch.compile'd (its cold and warm compile times are printed).
On a CPU without native bf16 (AVX2 only) the ComposerUNet rows run in fp32, as `train` does there, and the
bf16 rows are left out (emulated bf16 takes about a minute per step; --force-bf16 adds them).
--end-to-end adds the whole training step (shards -> decomposition -> step, bench/train.py's TrainingStep
with the loader) for wave 1's settings and today's defaults, in the same process.
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
from composer.models.groupnorm import use_nhwc_group_norm  # noqa: E402
from composer.models.unet import ComposerUNet  # noqa: E402
from composer.runtime import cpu_capability, cpu_supports_bf16  # noqa: E402

LOCAL = {"sketch": 1, "instances": 5, "depth": 1, "intensity": 1, "masking": 4}


def specs(word_dim: int, embed: int) -> dict[str, ConditionSpec]:
    return {
        "caption": ConditionSpec("caption", ("global", "tokens"), embed, token_dim=word_dim, vector_key="sentence",
                                 tokens_key="words", mask_key="words_mask"),
        "image_embedding": ConditionSpec("image_embedding", ("global",), embed),
        "palette": ConditionSpec("palette", ("global",), 275),
        **{n: ConditionSpec(n, ("local",), c) for n, c in LOCAL.items()},
    }


def conditions(batch: int, word_dim: int, embed: int) -> Conditions:
    return Conditions({
        "caption": {"sentence": torch.randn(batch, embed), "words": torch.randn(batch, 77, word_dim),
                    "words_mask": torch.ones(batch, 77, dtype=torch.bool)},
        "image_embedding": torch.randn(batch, embed), "palette": torch.rand(batch, 275),
        **{n: torch.rand(batch, c, 64, 64) for n, c in LOCAL.items()},
    })


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype = torch.bfloat16) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    seconds = best_time(lambda: a @ b, 5)
    return 2 * 2048**3 / seconds


def train_step(model, forward, precision: torch.dtype | None, fused: bool):
    optimizer = torch.optim.AdamW(model.parameters(), 1e-5, fused=fused or None)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            loss = forward().float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flops_of(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def plain_diffusers(preset: str, context_dim: int):
    """diffusers' UNet2DConditionModel with the preset's blocks and nothing of ours."""
    from diffusers import UNet2DConditionModel

    kw = model_kwargs(preset)
    return UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=3, down_block_types=tuple(kw["down_block_types"]),
        up_block_types=tuple(kw["up_block_types"]), block_out_channels=tuple(kw["block_out_channels"]),
        layers_per_block=kw["layers_per_block"], cross_attention_dim=context_dim,
        attention_head_dim=tuple(kw["attention_heads"]), norm_num_groups=min(32, min(kw["block_out_channels"]) // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (~3 min cold compile)")
    parser.add_argument("--end-to-end", action="store_true", help="add the whole training step (needs data/scenes)")
    parser.add_argument("--config", default="configs/train/tiny.yaml", help="the run for --end-to-end")
    parser.add_argument("--paper", action="store_true", help="add the paper preset (forward only; minutes)")
    parser.add_argument("--force-bf16", action="store_true",
                        help="bf16 rows even where the CPU emulates bf16 (a minute per step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = cpu_supports_bf16() or args.force_bf16
    compute = torch.bfloat16 if native else None  # None: fp32, no autocast
    name = "bf16" if native else "fp32"
    capability = cpu_capability()
    peak = matmul_peak(torch.bfloat16 if native else torch.float32)
    batch, word_dim, embed = args.batch, 128, 128
    print(f"CPU capability {capability}; native bf16: {cpu_supports_bf16()}; {name} matmul peak measured here: "
          f"{peak / 1e9:.0f} GFLOP/s (2048^3, {args.threads} threads); batch {batch}\n")
    if not native:
        print("(no native bf16 on this CPU: bf16 autocast is emulated, ~20x slower than fp32, and train's "
              "mixed_precision=auto runs fp32; bf16 rows are left out, --force-bf16 adds them)\n")
    print("| training step (tiny preset) | params (M) | GFLOP / fwd | ms / step | images/s | vs plain fp32 "
          f"| GFLOP/s | of {name} peak |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    x, t = torch.randn(batch, 3, 64, 64), torch.randint(0, 1000, (batch,))
    c = conditions(batch, word_dim, embed)
    context = torch.randn(batch, 1 + 77 + 8 + 8, 128)
    baseline = None

    def row(label, model, forward, precision, fused, note=""):
        nonlocal baseline
        flops = flops_of(forward)
        seconds = best_time(train_step(model, forward, precision, fused), args.repeats)
        rate = batch / seconds
        baseline = baseline or rate
        achieved = 3 * flops / seconds
        print(f"| {label}{note} | {count_parameters(model) / 1e6:.1f} | {flops / 1e9:.1f} | {seconds * 1000:.0f} | "
              f"{rate:.1f} | {rate / baseline:.2f}x | {achieved / 1e9:.0f} | {achieved / peak:.0%} |", flush=True)
        return rate

    plain = plain_diffusers("tiny", 128)
    row("diffusers UNet2DConditionModel, fp32, NCHW, AdamW loop", plain,
        lambda: plain(x, t, encoder_hidden_states=context).sample, None, False)
    if native:
        row("diffusers UNet2DConditionModel, bf16 autocast, NCHW, AdamW loop", plain,
            lambda: plain(x, t, encoder_hidden_states=context).sample, torch.bfloat16, False)
    ours = ComposerUNet(**model_kwargs("tiny", specs=specs(word_dim, embed)))
    row(f"ComposerUNet, {name}, NCHW, AdamW loop (wave 1)", ours, lambda: ours(x, t, c), compute, False)
    row(f"ComposerUNet, {name}, NCHW, fused AdamW (train default)", ours, lambda: ours(x, t, c), compute, True)
    ours = ours.to(memory_format=torch.channels_last)
    row(f"ComposerUNet, {name}, channels_last, fused AdamW", ours, lambda: ours(x, t, c), compute, True)
    use_nhwc_group_norm(ours)  # what train.memory_format=channels_last runs since 2026-12-03
    row(f"ComposerUNet, {name}, channels_last + NHWCGroupNorm, fused AdamW", ours, lambda: ours(x, t, c), compute,
        True)
    if args.compile:
        start = time.perf_counter()
        ours.unet.compile()
        step = train_step(ours, lambda: ours(x, t, c), compute, True)
        step()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        step()
        row("ComposerUNet, + torch.compile", ours, lambda: ours(x, t, c), compute, True,
            note=f" (first step {cold:.0f} s incl. compile, next {time.perf_counter() - start:.1f} s)")
    sampling(ours, x, t, c, args.repeats, native)
    if args.end_to_end:
        end_to_end(args, peak)
    if args.paper:
        paper()


def sampling(model, x, t, c, repeats: int, bf16: bool = True) -> None:
    model.eval()
    empty = c.subset([])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        guided = best_time(lambda: guided_prediction(model, x, t, c, 3.0), repeats)
        separate = best_time(lambda: (model(x, t, empty), model(x, t, c)), repeats)
    print(f"\nsampling step ({'bf16' if bf16 else 'fp32'}, guided, batch {x.shape[0]}): one batched forward {guided * 1000:.0f} ms, "
          f"two separate forwards {separate * 1000:.0f} ms")
    model.train()


def end_to_end(args, peak: float) -> None:
    """bench/train.py's TrainingStep over the real loader, wave 1's settings and today's, same process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train import build_step  # noqa: E402

    from composer.config import load_config
    from composer.data.loader import make_loader

    print("\n| end to end (shards -> decomposition -> step) | ms / step | images/s |")
    print("|---|---|---|")
    settings = {"wave 1 (NCHW, AdamW loop)": ["train.memory_format=contiguous", "train.fused_optimizer=false"],
                "NCHW, fused AdamW (the default until 2026-12-03)": ["train.memory_format=contiguous"],
                "today's defaults (memory_format auto: channels_last + NHWCGroupNorm where bf16 is native)": []}
    for label, overrides in settings.items():
        cfg = load_config([args.config], overrides)
        step, _ = build_step(cfg)
        loader = iter(make_loader(cfg.data, seed=cfg.seed, rank=0, world_size=1))
        batch_size, times = int(cfg.data.batch_size), []
        for index in range(3 + 12):
            start = time.perf_counter()
            micro = step.micro_batch(next(loader), index * batch_size)
            step.update(micro.finite)
            times.append(time.perf_counter() - start)
        seconds = sorted(times[3:])[len(times[3:]) // 2]
        print(f"| {label} | {seconds * 1000:.0f} | {batch_size / seconds:.1f} |", flush=True)


def paper() -> None:
    torch.manual_seed(0)
    model = ComposerUNet(**model_kwargs("paper", specs=specs(768, 768))).eval()
    c, x, t = conditions(1, 768, 768), torch.randn(1, 3, 64, 64), torch.randint(0, 1000, (1,))
    flops = flops_of(lambda: model(x, t, c))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_supports_bf16()):
        seconds = best_time(lambda: model(x, t, c), 1)
    print(f"\npaper preset: {count_parameters(model) / 1e6:.0f} M params, {flops / 1e9:.0f} GFLOP per forward at "
          f"batch 1, {seconds * 1000:.0f} ms per {'bf16' if cpu_supports_bf16() else 'fp32'} forward here (AdamW state would need "
          f"{count_parameters(model) * 16 / 2**30:.0f} GiB)")


if __name__ == "__main__":
    main()
