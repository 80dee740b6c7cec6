"""README command 1: `composer-diffusion demo` on the embedded default, with the committed demo model."""

import json

import numpy as np
import torch
from PIL import Image

from composer.cli import main
from composer.commands.demo import DEFAULT_MODEL
from composer.pipelines.composer_pipeline import ComposerPipeline


def test_demo_model_asset_loads_and_matches_the_code():
    """The committed weights load strictly into the current UNet (no missing or unexpected tensors)."""
    assert (DEFAULT_MODEL / "model_index.json").is_file(), f"missing demo model at {DEFAULT_MODEL}"
    pipe = ComposerPipeline.from_pretrained(DEFAULT_MODEL)
    index = json.loads((DEFAULT_MODEL / "model_index.json").read_text())
    assert index["sampling"]["scheduler"] in ("ddpm", "ancestral")
    assert {"caption", "palette", "sketch", "intensity"} <= set(pipe.decomposers.names)
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())


def test_demo_runs_all_four_steps(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--num", "16", "--steps", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[4/4] composed new images" in printed, printed
    assert "skipped: none" in printed
    for name in ("decomposition.png", "composed.png", "composed.txt"):
        assert (tmp_path / name).is_file(), name
    composed = np.asarray(Image.open(tmp_path / "composed.png").convert("RGB"), dtype=np.float32)
    # one row per composition, each row of five 128 px tiles plus labels
    assert composed.shape[1] >= 5 * 128 and composed.shape[0] >= 4 * 128
    # every generated tile (columns 3-5 of each row) has structure of its own: a flat or near-flat image
    # (generation returning grey, or a constant colour) fails; the labels above the tiles are left out
    rows = composed.shape[0] // 4  # 128 px tile + 16 px label
    for row in range(4):
        for column in (2, 3, 4):
            tile = composed[row * rows + 8 : row * rows + 120, column * 128 + 8 : (column + 1) * 128 - 8]
            assert tile.std(axis=(0, 1)).max() > 8, f"generated tile {row},{column} is flat"
