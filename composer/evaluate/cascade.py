"""How well each upsampling stage of the cascade restores held-out images, beside bicubic upsampling.

    result = evaluate_cascade(pipe, CascadeSettings(num=128, seed=99))
    picture = cascade_picture(pipe, seed=99, count=3)
    write_cascade_report(result, picture, "runs/eval-cascade")     # table.md, results.json, cascade.png

Held-out scenes are rendered at the pipeline's last resolution (1024 px: composer.data.scenes.generate_scene
(seed, k, 1024)). A stage of resolution r is measured against the true r px image (the render downsampled
with upsamplers.degrade.downsample, antialiased bicubic) and is fed the TRUE low-resolution image: that one
downsampled again by the stage's scale with make_lowres and no degradations, exactly how the stage's
training makes its input. The baseline is the bicubic upsampling the stage itself is conditioned on
(composer.models.adapters.resize_map "bicubic": torch bicubic, a = -0.75; antialiasing only acts when
shrinking). Measures, per scene, on [0, 1] float images (never quantised to 8 bits):

- psnr: PSNR in dB vs the true high-resolution image over RGB (capped at PSNR_CAP: identical images).
- ssim: SSIM vs the true image, Wang et al.'s 11 x 11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03, data
  range 1, valid windows only, computed per RGB channel and averaged (skimage's structural_similarity with
  gaussian_weights=True, use_sample_covariance=False, channel_axis).
- sharpness: mean Sobel gradient magnitude of the output's luma (BT.601) over the true image's (1 = as
  sharp as the truth; noise and ringing push it above 1). On flat-shaded scenes it hardly sees blur: a
  blurred step edge spreads its gradient over more pixels but keeps its sum (bicubic scores ~1.1-1.2).
- sharpness_rms: the same ratio of root-mean-square gradient magnitudes, which does fall with blur (a step
  blurred over w pixels keeps sum |g| but its sum |g|^2 falls as 1 / w): bicubic ~0.65 on the scenes.
- consistency: PSNR of the output downsampled back to the input size (the same antialiased downsampling)
  vs the input it was given.

Each is reported as the mean over scenes with its standard deviation and a 95 % confidence interval of
the mean (normal approximation, 1.96 sd / sqrt(n)), and so is the paired difference stage - bicubic.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from composer.evaluate.metrics import grayscale, psnr
from composer.evaluate.report import _atomic_write, _finite
from composer.models.adapters import resize_map
from composer.runtime import autocast, resolve_precision
from upsamplers.degrade import downsample, make_lowres

PSNR_CAP = 100.0  # dB: a finite score for identical images, far above anything an upsampler reaches
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
METRICS = ("psnr", "ssim", "sharpness", "sharpness_rms", "consistency")
METHODS = ("stage", "bicubic")
MEASURES = {
    "psnr": f"PSNR (dB, RGB, capped at {PSNR_CAP:g}) of the output vs the true high-resolution image",
    "ssim": f"SSIM vs the true image ({SSIM_WINDOW} x {SSIM_WINDOW} Gaussian window, sigma {SSIM_SIGMA}, valid "
            "windows; per RGB channel, averaged)",
    "sharpness": "mean Sobel gradient magnitude of the output's luma (BT.601) / the true image's (1 = as sharp "
                 "as the truth; blind to blur on flat-shaded scenes: a blurred edge keeps its summed gradient)",
    "sharpness_rms": "root-mean-square Sobel gradient magnitude of the output's luma / the true image's (falls "
                     "with blur; above 1: noise, ringing or jagged edges)",
    "consistency": "PSNR (dB) of the output downsampled back to the input size (antialiased bicubic, the "
                   "training's downsampling) vs the input",
}
TILE = 256  # side of a cell of the picture
LABEL_HEIGHT = 22


# --- measures (all: (B, 3, H, W) float in [0, 1] -> (B,)) ------------------------------------------------------


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(x * x) / (2 * sigma * sigma))
    return window / window.sum()


def _valid_filter(length: int, window: torch.Tensor) -> torch.Tensor:
    """(length - k + 1, length) banded matrix: M @ v is v filtered by ``window`` over its valid positions."""
    rows = torch.arange(length - window.numel() + 1)
    matrix = torch.zeros(len(rows), length, dtype=window.dtype)
    for k, weight in enumerate(window):
        matrix[rows, rows + k] = weight
    return matrix


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of a vs b, (B, C, H, W) in [0, 1] -> (B,): the SSIM map over the valid
    11 x 11 Gaussian windows (sigma 1.5) of each channel, averaged over channels and positions."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim: two (B, C, H, W) tensors of one shape are needed, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW} px a side, got {tuple(a.shape[-2:])}")
    window = _gaussian_window().float()
    # The separable blur as two banded matrix products: BLAS runs them several times faster than a 1-channel
    # conv on the CPU (a 1024 px image pair in well under a second).
    rows = _valid_filter(a.shape[-2], window).to(a.device)
    cols = _valid_filter(a.shape[-1], window).to(a.device).T
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    scores = []
    for x, y in zip(a.float(), b.float()):  # one image at a time: five (C, H, W) maps each
        # centred per channel so that E[x^2] - E[x]^2 loses nothing in float32 (the moments are shift-free)
        shift_x, shift_y = x.mean((1, 2), keepdim=True), y.mean((1, 2), keepdim=True)
        x, y = x - shift_x, y - shift_y
        mean_x, mean_y, xx, yy, xy = (rows @ m @ cols for m in torch.stack([x, y, x * x, y * y, x * y]))
        var_x, var_y, cov = xx - mean_x ** 2, yy - mean_y ** 2, xy - mean_x * mean_y
        mean_x, mean_y = mean_x + shift_x, mean_y + shift_y
        index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
        scores.append(index.double().mean())
    return torch.stack(scores).float()


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W): Sobel gradient magnitude of the BT.601 luma (edge-replicated
    borders, so a flat border adds nothing)."""
    luma = grayscale(images.float())
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=images.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]
    gradients = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients.pow(2).sum(1, keepdim=True).sqrt()


def sharpness(images: torch.Tensor, reference: torch.Tensor, power: int = 1) -> torch.Tensor:
    """The power mean of the gradient magnitude of ``images`` as a fraction of ``reference``'s (B,); 1 = as
    sharp. power 1: the mean; power 2: the root mean square, which falls when edges are blurred."""
    ours = gradient_magnitude(images).pow(power).flatten(1).mean(1).pow(1 / power)
    theirs = gradient_magnitude(reference).pow(power).flatten(1).mean(1).pow(1 / power)
    return ours / theirs.clamp_min(1e-8)


def consistency(output: torch.Tensor, lowres: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of ``output`` (B, 3, s h, s w) downsampled by s (antialiased bicubic) vs ``lowres``."""
    scale = output.shape[-1] // lowres.shape[-1]
    if scale < 1 or tuple(output.shape[-2:]) != (lowres.shape[-2] * scale, lowres.shape[-1] * scale):
        raise ValueError(f"consistency: the output {tuple(output.shape[-2:])} is not an integer multiple of the "
                         f"input {tuple(lowres.shape[-2:])}")
    return psnr(downsample(output.float(), scale), lowres.float(), cap=PSNR_CAP)


def bicubic(lowres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The baseline: ``lowres`` (B, 3, h, w) upsampled to ``size`` as the stage's own input is, in [0, 1]."""
    return resize_map(lowres.float(), size, "bicubic").clamp(0, 1)


def scores(output: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every measure of ``output`` vs the true ``high`` image and the ``low`` input it was made from."""
    output, high, low = output.float(), high.float(), low.float()
    return {"psnr": psnr(output, high, cap=PSNR_CAP), "ssim": ssim(output, high),
            "sharpness": sharpness(output, high), "sharpness_rms": sharpness(output, high, power=2),
            "consistency": consistency(output, low)}


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation and the 95 % confidence half-width of the mean (normal approximation)."""
    data = np.asarray(values, dtype=np.float64)
    n = int(data.size)
    std = float(data.std(ddof=1)) if n > 1 else None
    return {"mean": float(data.mean()) if n else None, "std": std,
            "ci95": 1.96 * std / math.sqrt(n) if std is not None else None, "n": n}


# --- the evaluation ---------------------------------------------------------------------------------------------


@dataclass
class CascadeSettings:
    """What evaluate_cascade measures."""

    num: int = 128  # held-out scenes: generate_scene(seed, k, size) for k in range(num)
    seed: int = 99  # the scenes' seed (no training uses 99); scene k's stage samples start from seed + k
    stages: Sequence[str] | None = None  # stage names to measure (default: all the pipeline's)
    steps: int | None = None  # sampling steps of every stage (default: each stage's saved count)
    batch: int = 2  # scenes per sampling call
    size: int | None = None  # render side (default: the pipeline's last resolution); every size scales with it
    precision: str | None = None  # default: the pipeline's saved setting
    # a stage that takes local maps (settings.local, e.g. sketch) gets them decomposed from the TRUE high-res
    # image at its output size (what a user's sketch of the scene would give); False measures it without them
    local_maps: bool = True


def select_stages(pipe: Any, names: Sequence[str] | None) -> list[Any]:
    """The pipeline's upsampling stages named in ``names`` (default: all), in cascade order."""
    stages = pipe.upsamplers
    if not stages:
        raise ValueError("this pipeline has no upsampling stages; attach one with `composer-diffusion "
                         "pipeline attach-stage DIR STAGE_DIR`")
    if names is None:
        return stages
    known = [s.settings.name for s in stages]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--stages: no stage {', '.join(map(repr, unknown)) or '(none given)'} in this pipeline; "
                         f"it has {', '.join(known)}")
    return [s for s in stages if s.settings.name in names]


def plan(pipe: Any, stages: Sequence[Any], size: int | None) -> dict[str, Any]:
    """{"render": side, stage name: {"high": side, "low": side, "scale": s}}: each stage's true sizes when the
    scenes render at ``size`` (default: the pipeline's last resolution; a smaller one shrinks all alike)."""
    top = max(int(s.settings.resolution) for s in pipe.upsamplers)
    size = int(size or top)
    sizes: dict[str, Any] = {"render": size}
    for stage in stages:
        name, resolution, scale = stage.settings.name, int(stage.settings.resolution), int(stage.settings.scale)
        ratio = top // resolution  # how much smaller than the render this stage's output is
        high = size // ratio if top % resolution == 0 else 0
        low = high // scale
        if not high or size % ratio or high % scale or low % stage.input_multiple or low < 1:
            raise ValueError(f"--size {size}: the stage {name!r} would be measured at {size / ratio:g} px from a "
                             f"{size / ratio / scale:g} px input, but its input side must be a whole multiple of "
                             f"{stage.input_multiple}; give a --size that is a multiple of "
                             f"{ratio * scale * stage.input_multiple}, e.g. {top}")
        if high < SSIM_WINDOW:
            raise ValueError(f"--size {size}: the stage {name!r} would be measured at {high} px, below SSIM's "
                             f"{SSIM_WINDOW} px window; give a larger --size")
        sizes[name] = {"high": high, "low": low, "scale": scale}
    return sizes


def held_out(seed: int, indices: Sequence[int], size: int) -> torch.Tensor:
    """(B, 3, size, size) in [0, 1]: scenes ``indices`` of the run seeded by ``seed``, rendered at ``size``."""
    from composer.data.scenes import generate_scene

    return torch.stack([torch.from_numpy(np.ascontiguousarray(generate_scene(seed, int(k), size).image))
                        .permute(2, 0, 1).float() for k in indices])


def true_pair(render: torch.Tensor, high: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(true high-res at ``high`` px, true low-res at high / scale px) from a render, as training makes them."""
    truth = render if render.shape[-1] == high else downsample(render, render.shape[-1] // high)
    lowres = make_lowres(truth, scale, None, torch.Generator().manual_seed(0))  # no degradation: no draw is used
    return truth, lowres


def _true_local_maps(pipe: Any, stage: Any, high: torch.Tensor):
    """The stage's local maps (its settings.local) of the true high-res images, or None when it takes none."""
    names = list(stage.settings.local)
    if not names:
        return None
    if pipe.decomposers is None:
        raise ValueError(f"stage {stage.settings.name!r} takes {', '.join(names)}: load the pipeline with its decomposers")
    return pipe.decomposers.decompose(high.to(pipe.unet.device), names=names)


def _generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed) + int(k)) for k in indices]


def evaluate_cascade(pipe: Any, settings: CascadeSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure each chosen stage of ``pipe`` on ``settings.num`` held-out scenes (see the module docstring);
    a line per batch goes to ``log``. Returns the JSON-ready result."""
    # 1. Check inputs: the stages, their sizes and the precision
    started = time.perf_counter()
    if settings.num < 1 or settings.batch < 1:
        raise ValueError(f"num and batch must be at least 1, got {settings.num} and {settings.batch}")
    stages = select_stages(pipe, settings.stages)
    sizes = plan(pipe, stages, settings.size)
    precision = settings.precision or pipe.sampling.precision
    resolve_precision(precision, pipe.unet.device)  # an impossible precision fails before any work
    values = {s.settings.name: {m: {k: [] for k in METRICS} for m in METHODS} for s in stages}
    seconds = {s.settings.name: 0.0 for s in stages}
    render_seconds = 0.0
    batches = list(range(0, settings.num, settings.batch))
    # 2. Per batch: render the scenes once, then each stage from its true low-res input
    for number, start in enumerate(batches, 1):
        indices = list(range(start, min(settings.num, start + settings.batch)))
        moment = time.perf_counter()
        render = held_out(settings.seed, indices, sizes["render"])
        render_seconds += time.perf_counter() - moment
        line = []
        for stage in stages:
            name = stage.settings.name
            high, low = true_pair(render, sizes[name]["high"], sizes[name]["scale"])
            local = _true_local_maps(pipe, stage, high) if settings.local_maps else None
            moment = time.perf_counter()
            output = stage.upsample(low, generator=_generators(settings.seed, indices), steps=settings.steps,
                                    autocast=lambda device=stage.unet.device: autocast(precision, device), local=local)
            spent = time.perf_counter() - moment
            seconds[name] += spent
            line.append(f"{name} {spent:.1f} s")
            outputs = {"stage": output.float().cpu(), "bicubic": bicubic(low, tuple(high.shape[-2:]))}
            for method, image in outputs.items():
                for metric, score in scores(image, high, low).items():
                    values[name][method][metric].extend(score.tolist())
        log(f"batch {number}/{len(batches)} (scenes {indices[0]}-{indices[-1]}): render {sizes['render']} px, "
            + ", ".join(line))
    # 3. Summaries: each method's measures and the paired difference stage - bicubic
    result_stages = {}
    for stage in stages:
        name, per_scene = stage.settings.name, values[stage.settings.name]
        entry = {"input": sizes[name]["low"], "output": sizes[name]["high"], "scale": sizes[name]["scale"],
                 "local_maps": list(stage.settings.local) if settings.local_maps else [],
                 "steps": int(settings.steps or stage.settings.steps), "aug_level": float(stage.settings.aug_level),
                 "seconds": round(seconds[name], 2), "seconds_per_scene": round(seconds[name] / settings.num, 3)}
        for method in METHODS:
            entry[method] = {m: summary(per_scene[method][m]) for m in METRICS}
        entry["difference"] = {m: summary(np.subtract(per_scene["stage"][m], per_scene["bicubic"][m]))
                               for m in METRICS}
        entry["per_scene"] = per_scene
        result_stages[name] = entry
        log(f"{name}: {seconds[name]:.1f} s for {settings.num} scenes ({seconds[name] / settings.num:.2f} s a scene, "
            f"{entry['steps']} steps, {sizes[name]['low']} -> {sizes[name]['high']} px)")
    return {"num": settings.num, "seed": settings.seed, "render_size": sizes["render"], "precision": precision,
            "scenes": f"composer.data.scenes.generate_scene({settings.seed}, k, {sizes['render']}), "
                      f"k = 0..{settings.num - 1}",
            "baseline": "bicubic upsampling of the same true low-res input (resize_map 'bicubic', the stage's own "
                        "conditioning input)",
            "psnr_cap_db": PSNR_CAP, "measures": dict(MEASURES), "stages": result_stages,
            "seconds": {"render": round(render_seconds, 2), "stages": {k: round(v, 2) for k, v in seconds.items()},
                        "total": round(time.perf_counter() - started, 2)}}


# --- the report ---------------------------------------------------------------------------------------------------


def _cell(stats: Mapping[str, Any], digits: int, signed: bool = False) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = f"{stats['mean']:+.{digits}f}" if signed else f"{stats['mean']:.{digits}f}"
    return text if stats["ci95"] is None else f"{text} ± {stats['ci95']:.{digits}f}"


def markdown(result: Mapping[str, Any]) -> str:
    """The result as a markdown table (mean ± 95 % CI over scenes) with what each column measures."""
    digits = {"psnr": 2, "ssim": 3, "sharpness": 2, "sharpness_rms": 2, "consistency": 2}
    lines = [f"# Cascade stages on {result['num']} held-out scenes",
             "",
             f"Scenes: `{result['scenes']}`; each stage fed the true low-res image; precision {result['precision']}. "
             "Mean ± 95 % CI over scenes; `stage - bicubic` is the paired difference.",
             "",
             "| stage | px | method | PSNR dB | SSIM | sharpness | RMS sharpness | consistency dB | s / scene |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["stages"].items():
        size = f"{entry['input']} -> {entry['output']}"
        maps = f", true {'+'.join(entry['local_maps'])}" if entry.get("local_maps") else ""
        rows = [(f"stage ({entry['steps']} steps{maps})", entry["stage"], False, f"{entry['seconds_per_scene']:.2f}"),
                ("bicubic", entry["bicubic"], False, ""), ("stage - bicubic", entry["difference"], True, "")]
        for i, (method, stats, signed, time_cell) in enumerate(rows):
            cells = [_cell(stats[m], digits[m], signed) for m in METRICS]
            lines.append(f"| {name if i == 0 else ''} | {size if i == 0 else ''} | {method} | {' | '.join(cells)} | "
                         f"{time_cell} |")
    lines += ["", "Measures:", ""] + [f"- {m}: {d}" for m, d in result["measures"].items()]
    lines += [f"- baseline: {result['baseline']}"]
    return "\n".join(lines) + "\n"


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _to_pil(image: torch.Tensor) -> Image.Image:
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def _crop_box(reference: torch.Tensor, side: int) -> tuple[int, int]:
    """(top, left) of the ``side`` px window of ``reference`` (3, H, W) with the most edges (stride side / 2)."""
    energy = gradient_magnitude(reference[None])[0, 0]
    height, width = energy.shape
    best, box = -1.0, (0, 0)
    for top in range(0, height - side + 1, max(1, side // 2)):
        for left in range(0, width - side + 1, max(1, side // 2)):
            value = float(energy[top : top + side, left : left + side].mean())
            if value > best:
                best, box = value, (top, left)
    return box


@torch.no_grad()
def cascade_picture(pipe: Any, seed: int = 99, count: int = 3, steps: int | None = None,
                    precision: str | None = None, log: Callable[[str], None] = print) -> Image.Image | None:
    """For ``count`` held-out scenes: the base model's sample from the scene's sketch + palette (the
    conditions it has of the two), each stage's output of it (the stages chained as the pipeline runs
    them) beside bicubic upsampling of that same base sample; outputs above TILE px are shown downscaled
    with the crop's box drawn and as a TILE px crop at 1:1."""
    if count < 1:
        return None
    # 1. The base samples from the scenes' conditions
    started = time.perf_counter()
    base_size = int(pipe.unet.config.sample_size)
    indices = list(range(count))
    scenes = held_out(seed, indices, base_size)
    names = [n for n in ("sketch", "palette") if pipe.decomposers is not None and n in pipe.decomposers.names]
    precision = precision or pipe.sampling.precision
    base = pipe(images={n: scenes for n in names} or None, generator=_generators(seed, indices), size=base_size,
                precision=precision, output_type="pt", progress=False).images.float().cpu()
    spent = [f"base {time.perf_counter() - started:.1f} s"]
    # 2. Each stage on the previous one's output; bicubic from the base sample
    columns: list[tuple[str, torch.Tensor, str]] = [
        (f"scene ({' + '.join(names) or 'unused'})", scenes, "whole"), (f"base {base_size} px", base, "whole")]
    x = base
    for stage in pipe.upsamplers:
        moment = time.perf_counter()
        x = stage.upsample(x, generator=_generators(seed, indices), steps=steps,
                           autocast=lambda device=stage.unet.device: autocast(precision, device)).float().cpu()
        spent.append(f"{stage.settings.name} {time.perf_counter() - moment:.1f} s")
        side = int(x.shape[-1])
        columns += [(f"bicubic {side}", bicubic(base, tuple(x.shape[-2:])), "whole"),
                    (f"{stage.settings.name}", x, "whole")]
        if side > TILE:
            columns += [(f"bicubic {side}, 1:1 crop", columns[-2][1], "crop"),
                        (f"{stage.settings.name}, 1:1 crop", x, "crop")]
    # 3. Lay out: a header row, then one row per scene
    cell = TILE + 4
    sheet = Image.new("RGB", (len(columns) * cell + 4, LABEL_HEIGHT + count * cell + 4), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for c, (label, _, _) in enumerate(columns):
        draw.text((4 + c * cell, 4), label, fill=(0, 0, 0), font=font)
    for r in range(count):
        top = LABEL_HEIGHT + 4 + r * cell
        boxes: dict[int, tuple[int, int]] = {}
        for c, (_, images, view) in enumerate(columns):
            image, side = images[r], int(images.shape[-1])
            if side > TILE and side not in boxes:  # one window per size, where the bicubic image has edges
                boxes[side] = _crop_box(bicubic(base[r : r + 1], tuple(images.shape[-2:]))[0], TILE)
            if view == "crop":
                y, x0 = boxes[side]
                tile = _to_pil(image[:, y : y + TILE, x0 : x0 + TILE])
            elif side > TILE:
                tile = _to_pil(downsample(image[None], side // TILE)[0] if side % TILE == 0 else
                               resize_map(image[None], (TILE, TILE), "bicubic")[0])
                y, x0 = (v * TILE // side for v in boxes[side])
                ImageDraw.Draw(tile).rectangle([x0, y, x0 + TILE * TILE // side - 1, y + TILE * TILE // side - 1],
                                               outline=(255, 0, 0), width=2)
            else:
                tile = _to_pil(image).resize((TILE, TILE), Image.NEAREST)
            sheet.paste(tile, (4 + c * cell, top))
    log(f"picture: {count} scenes through base -> {' -> '.join(s.settings.name for s in pipe.upsamplers)} in "
        f"{time.perf_counter() - started:.1f} s ({', '.join(spent)})")
    return sheet


def write_cascade_report(result: Mapping[str, Any], picture: Image.Image | None,
                         out: str | Path) -> dict[str, Path]:
    """table.md, results.json and (when given) cascade.png in ``out``, each written atomically."""
    out = Path(out)
    paths = {
        "json": _atomic_write(out / "results.json",
                              lambda p: p.write_text(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")),
        "markdown": _atomic_write(out / "table.md", lambda p: p.write_text(markdown(result))),
    }
    if picture is not None:
        paths["picture"] = _atomic_write(out / "cascade.png", lambda p: picture.save(p, format="PNG"))
    return paths
