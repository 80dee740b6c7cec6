"""Step 4 of the demo: compose new images from conditions taken from two different scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from composer.conditions import Conditions
from composer.imageio import grid, labelled_row
from composer.pipelines.composer_pipeline import ComposerPipeline

# (label, {condition: which scene it is taken from})
COMPOSITIONS = (
    ("sketch A + palette B", {"sketch": 0, "palette": 1}),
    ("depth A + caption B", {"depth": 0, "caption": 1}),
    ("instances A + image emb. B", {"instances": 0, "image_embedding": 1}),
    ("caption A", {"caption": 0}),
)


def _take(value, index: int):
    return {k: v[index : index + 1] for k, v in value.items()} if isinstance(value, dict) else value[index : index + 1]


@torch.no_grad()
def compose_from_two_scenes(model: str | Path, batch: dict[str, Any], out: Path, *, steps: int = 25, seed: int = 0,
                            samples: int = 3, guidance_scale: float = 3.0, device: str = "auto",
                            precision: str | None = None, size: int | None = None) -> Path:
    """Decompose scenes A and B (the first two of ``batch``), then sample from mixed condition subsets.

    Writes ``out/composed.png``: one row per composition with A, B and ``samples`` generated images at the
    base's size. When the pipeline has upsampling stages, the first sample of each composition also goes
    through the cascade: ``out/composed-<size>/<n>-<label>.png`` at ``size`` (default the last stage's).
    """
    pipe = ComposerPipeline.from_pretrained(model, device=device)
    if size is not None and int(size) not in pipe.sizes():
        raise ValueError(f"--size {size} is not a stage of {model}; it stops at {', '.join(map(str, pipe.sizes()))}")
    images = batch["image"][:2].to(pipe.device)
    extras = {k: v[:2].to(pipe.device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "image"}
    names = [n for n in pipe.decomposers.names if n != "masking"]
    reps = pipe.decomposers.decompose(images, captions=batch["caption"][:2], extras=extras, names=names)
    rows, finals = [], []
    base_size = pipe.sizes()[0]
    for label, sources in COMPOSITIONS:
        if any(name not in reps.values for name in sources):
            continue
        values = {name: _take(reps[name], index) for name, index in sources.items()}
        conditions = Conditions(values).subset(values)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(samples)]
        result = pipe(conditions, num_images_per_prompt=samples, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=generators, output_type="pt", progress=False,
                      precision=precision, size=base_size).images
        if pipe.upsamplers:
            finals.append((label, result[:1]))
        tiles = [("scene A", images[:1].cpu()), ("scene B", images[1:2].cpu())] + [(f"#{i + 1}", result[i : i + 1]) for i in range(samples)]
        rows.append(labelled_row([(f"{label}" if i == 2 else t, im) for i, (t, im) in enumerate(tiles)], tile=128))
    path = out / "composed.png"
    grid(rows).save(path)
    if finals and (size is None or int(size) > base_size):
        upsample_compositions(pipe, finals, out, seed=seed, precision=precision, size=size)
    (out / "composed.txt").write_text(
        "".join(f"{label}: " + ", ".join(f"{n} from scene {'AB'[i]}" for n, i in src.items()) + "\n"
                for label, src in COMPOSITIONS)
        + f"scene A caption: {batch['caption'][0]}\nscene B caption: {batch['caption'][1]}\n"
    )
    return path


def _slug(label: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in label.lower()).split())


def upsample_compositions(pipe: ComposerPipeline, finals: list[tuple[str, torch.Tensor]], out: Path, *, seed: int = 0,
                          precision: str | None = None, size: int | None = None) -> Path:
    """Each (label, (1, 3, 64, 64) sample) up the cascade to ``size`` (default: the last stage's), saved."""
    from composer.imageio import save_image

    size = int(size or pipe.sizes()[-1])
    folder = out / f"composed-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    for number, (label, image) in enumerate(finals, start=1):
        big = pipe.upsample(image.to(pipe.device), size=size, generator=torch.Generator().manual_seed(seed + number),
                            precision=precision, output_type="pt", progress=False).images
        save_image(big[0].float().cpu(), folder / f"{number}-{_slug(label)}.png")
    return folder
