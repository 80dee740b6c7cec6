"""Writing an evaluation: results.json, results.md (tables) and contact.png (a contact sheet).

Every file is written to a temporary name beside it and renamed, so a failed run leaves no partial file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 190
TILE = 96
PADDING = 2


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _rescale_note(rescale: float | None) -> str:
    return f" rescaled by {rescale}" if rescale else ""  # reports of plain guidance read as they always did


def markdown(result: Mapping[str, Any]) -> str:
    """The tables of an evaluation as markdown."""
    lines = [
        f"# Evaluation of {result.get('model') or 'the pipeline'}",
        "",
        f"{result['num']} held-out scenes ({', '.join(result['shards'])}), {result['steps']} steps of "
        f"{result['sampler']}, guidance {result['guidance_scale']}"
        f"{_rescale_note(result.get('guidance_rescale'))} "
        f"({'masking guided in edits' if result.get('masking_guided') else 'masking held in c1 in edits'}), seeds {result['seed']}..{result['seed'] + result['num'] - 1}, "
        f"{result['resolution']} px; {result['seconds']['total']:.0f} s in all.",
        "",
        "Each condition's own measure with that condition alone (`single`) and with every condition (`all`), "
        "beside its floor (`none`: nothing given) and its ceiling (the source image scored the same way); "
        "`gap` = (score - floor) / (ceiling - floor). "
        f"PSNR is capped at {result['psnr_cap_db']:g} dB (the ceiling of the PSNR measures).",
        "",
        "| condition | measure | none (floor) | single | all | source (ceiling) | gap single | gap all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        digits = 1 if "psnr" in row["measure"] else 3
        lines.append(f"| {row['condition']} | {row['measure']} | {_number(row['floor'], digits)} | "
                     f"{_number(row['single'], digits)} | {_number(row['all'], digits)} | "
                     f"{_number(row['ceiling'], digits)} | {_percent(row['gap_closed'])} | "
                     f"{_percent(row['gap_closed_all'])} |")
    edit = result["runs"].get("masking", {}).get("changed_outside")
    if edit:
        lines += ["", f"Region edit (masking, centre half of each side regenerated): {edit['total']} pixels changed "
                      f"outside the mask over {result['num']} images (at most {edit['max_per_image']} in one image, of "
                      f"{edit['pixels_outside_per_image']} outside pixels each); must be 0."]
    if result["pairs"]:
        lines += ["", "Pairs: the first condition from scene k, the second from scene k + 1. `kept` = the share of the "
                      "condition's single-run gain over `none` the pair keeps; both must keep >= "
                      f"{100 * result['keep_threshold']:.0f} %.", "",
                  "| pair | first: single -> pair (kept) | second: single -> pair (kept) | both keep >= 90 % |",
                  "|---|---|---|---|"]
        for row in result["pairs"]:
            cells = []
            for which in ("first", "second"):
                part = row[which]
                digits = 1 if "psnr" in part["measure"] else 3
                cells.append(f"{part['condition']} {part['measure']}: {_number(part['single'], digits)} -> "
                             f"{_number(part['pair'], digits)} ({_percent(part['kept_gain'])})")
            lines.append(f"| {row['pair']} | {cells[0]} | {cells[1]} | {_number(row['both_keep_90'])} |")
    reference = result.get("distribution_reference", {})
    lines += ["", "Distribution distance of each run's samples to the held-out images, on scene-CLIP image features "
                  "(scene-CLIP FID/KID, not Inception FID; with this few samples FID is biased upwards, compare rows "
                  f"with each other). Real vs real ({reference.get('what', '')}): FID {_number(reference.get('fid'), 2)}, "
                  f"KID {_number(reference.get('kid'), 4)}.", "",
              "| run | scene-CLIP FID | scene-CLIP KID | seconds |", "|---|---|---|---|"]
    for label, run in result["runs"].items():
        lines.append(f"| {label} | {_number(run['fid'], 2)} | {_number(run['kid'], 4)} | {run['seconds']:.0f} |")
    lines += ["", "Measures:", ""] + [f"- `{m}`: {d}" for m, d in result["measures"].items()]
    if result["notes"]:
        lines += ["", "Not measured:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def contact_sheet(samples: Mapping[str, torch.Tensor], columns: int = 8, tile: int = TILE) -> Image.Image:
    """One labelled row per run (the held-out sources first), the first ``columns`` scenes across."""
    labels = ["source"] + [k for k in samples if k != "source"]
    count = min(columns, samples["source"].shape[0])
    cell = tile + PADDING
    sheet = Image.new("RGB", (LABEL_WIDTH + count * cell + PADDING, len(labels) * cell + PADDING), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, label in enumerate(labels):
        images = samples[label][:count].detach().float().clamp(0, 1)
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        top = PADDING + r * cell
        for c in range(count):
            picture = Image.fromarray(np.ascontiguousarray(pixels[c])).resize((tile, tile), Image.NEAREST)
            sheet.paste(picture, (LABEL_WIDTH + PADDING + c * cell, top))
        draw.text((4, top + tile // 2 - 5), label[:30], fill=(0, 0, 0), font=font)
    return sheet


def _finite(value: Any) -> Any:
    """NaN and infinities (e.g. a share with nothing to find) as JSON null, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(result: Mapping[str, Any], samples: Mapping[str, torch.Tensor], out: str | os.PathLike,
                 columns: int = 8) -> dict[str, Path]:
    """results.json, results.md and contact.png in ``out``."""
    out = Path(out)
    paths = {
        "json": _atomic_write(out / "results.json",
                              lambda p: p.write_text(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")),
        "markdown": _atomic_write(out / "results.md", lambda p: p.write_text(markdown(result))),
        "sheet": _atomic_write(out / "contact.png", lambda p: contact_sheet(samples, columns).save(p, format="PNG")),
    }
    return paths
