import subprocess
import sys

import pytest

from composer.cli import main
from composer.config import load_config, save_config


def test_presets_and_overrides_merge_over_typed_defaults(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  batch_size: 3\ntrain:\n  lr: 0.5\n")
    cfg = load_config([preset], ["train.lr=1e-4", "data.extras=[depth]"])
    assert cfg.data.batch_size == 3 and cfg.train.lr == 1e-4 and list(cfg.data.extras) == ["depth"]
    path = save_config(cfg, tmp_path / "run")
    assert load_config([path]).train.lr == 1e-4


@pytest.mark.parametrize("override, words", [
    ("train.lr=fast", "train.lr"),
    ("train.no_such_key=1", "no_such_key"),
    ("train.lr", "key=value"),
    ("data.shards=[unclosed", "data.shards"),
])
def test_bad_overrides_name_the_problem(override, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        load_config([], [override])


def test_missing_preset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(["no/such/preset"])


def test_packaged_presets_load():
    cfg = load_config(["data/scenes"])
    assert cfg.data.resolution == 64


def test_version_help_and_module_entry_point(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "composer-diffusion" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "composer", "--help"], capture_output=True, text=True, check=True)
    assert "scenes" in out.stdout and "shards" in out.stdout


def test_train_refuses_zero_images_before_touching_the_output_dir(tmp_path, capsys):
    from composer.cli import main

    out = tmp_path / "run"
    assert main(["train", "--set", "train.total_images=0", "--set", f"output_dir={out}"]) == 2
    assert "train.total_images must be at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_refusal_under_a_launcher_is_left_in_its_error_file(tmp_path, monkeypatch, capsys):
    """torchrun / accelerate launch set TORCHELASTIC_ERROR_FILE; their failure summary then shows our line."""
    import json

    error_file = tmp_path / "elastic" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("composer-diffusion train: error:") and "missing.yaml" in line
    data = json.loads(error_file.read_text())
    assert data["message"] == line and data["timestamp"] > 0
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    error_file.unlink()
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2 and not error_file.exists()
