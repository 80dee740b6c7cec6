"""train.mixed_precision=auto under accelerate launch: its own default "no" is not taken as a choice."""

from __future__ import annotations

import pytest

import composer.train.accelerator as acc
from composer.runtime import cpu_supports_bf16

LAUNCH = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m",
          "composer", "train", "--config", "configs/train/tiny.yaml"]


@pytest.fixture
def no_default_config(tmp_path, monkeypatch):
    import accelerate.commands.config.config_args as config_args

    monkeypatch.setattr(config_args, "default_config_file", str(tmp_path / "default_config.yaml"))
    monkeypatch.delenv("ACCELERATE_CONFIG_FILE", raising=False)
    return tmp_path / "default_config.yaml"


def test_the_launchers_default_is_not_a_choice(no_default_config):
    assert not acc.launcher_chose_fp32(LAUNCH)
    assert acc.launcher_chose_fp32(LAUNCH[:3] + ["--mixed_precision", "no"] + LAUNCH[3:])
    assert acc.launcher_chose_fp32(LAUNCH[:3] + ["--mixed_precision=no"] + LAUNCH[3:])
    assert acc.launcher_chose_fp32(LAUNCH[:3] + ["--config_file", "my.yaml"] + LAUNCH[3:])
    no_default_config.write_text("mixed_precision: 'no'\n")  # `accelerate config` was run: its answer counts
    assert acc.launcher_chose_fp32(LAUNCH)


def test_auto_picks_the_cpus_precision_unless_fp32_was_chosen(no_default_config, monkeypatch):
    native = "bf16" if cpu_supports_bf16() else "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setattr(acc, "launcher_chose_fp32", lambda: False)
    assert acc.resolve_mixed_precision("auto", use_cpu=True) == native
    assert acc.resolve_mixed_precision("no", use_cpu=True) == "no"  # train.mixed_precision itself always wins
    monkeypatch.setattr(acc, "launcher_chose_fp32", lambda: True)
    assert acc.resolve_mixed_precision("auto", use_cpu=True) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # bf16 or fp16 from the launcher is always a choice
    assert acc.resolve_mixed_precision("auto", use_cpu=True) == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert acc.resolve_mixed_precision("auto", use_cpu=True) == native
