"""The training loop end to end on tiny shards: steps, generate, exact resume, SIGKILL, two processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from composer.cli import main
from composer.config import load_config
from composer.data.shards import write_scene_shards
from composer.train.checkpoint import STATE_FILE
from composer.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(block_out_channels=[16, 32], attention_heads=[1, 2], layers_per_block=1,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], context_dim=16, local_embed_channels=4,
                 sample_size=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-scenes")
    write_scene_shards(root, 48, 64, seed=3, shard_size=12, progress=False)
    return str(root / "scenes-*.tar")


def make_config(shards: str, out: Path, **train):
    cfg = load_config([], [])
    cfg.output_dir = str(out)
    cfg.data.shards = [shards]
    cfg.data.resolution = 32
    cfg.data.batch_size = 4
    cfg.data.num_workers = 0
    cfg.data.shuffle_buffer = 16
    cfg.decomposers.enabled = ["palette", "sketch", "intensity", "masking"]
    cfg.model.overrides = dict(TINY_UNET)
    settings = dict(lr=1e-3, warmup_images=8, lr_schedule="cosine", total_images=8, checkpoint_every_images=0,
                    keep_checkpoints=2, sample_every_images=0, sample_images=2, log_every_steps=1,
                    progress=False, tensorboard=False, mixed_precision="no")
    settings.update(train)
    for key, value in settings.items():
        cfg.train[key] = value
    cfg.sample.steps = 1
    return cfg


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("checkpoint-*") if (p / STATE_FILE).is_file())


def test_two_steps_write_a_checkpoint_and_a_pipeline_generate_loads(shards, tmp_path):
    out = tmp_path / "run"
    summary = train(make_config(shards, out, tensorboard=True))
    assert summary["step"] == 2 and summary["images_seen"] == 8 and summary["skipped_steps"] == 0
    [checkpoint] = checkpoints(out)
    assert checkpoint.name == "checkpoint-000000000008"
    assert json.loads((checkpoint / STATE_FILE).read_text())["step"] == 2
    assert {"model.safetensors", "ema.safetensors", "optimizer.bin", "data_state_0.json"} <= {
        p.name for p in checkpoint.iterdir()}
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "images_seen,loss" and [r.split(",")[0] for r in rows[1:]] == ["4", "8"]
    assert list((out / "samples").glob("grid-*.png")) and list((out / "tensorboard").iterdir())
    assert OmegaConf.load(out / "config.yaml").train.total_images == 8
    run_summary = json.loads((out / "run_summary.json").read_text())
    assert run_summary["session_images"] == 8 and run_summary["resumed_from"] is None
    assert run_summary["session_seconds"] > 0
    image = tmp_path / "gen.png"
    code = main(["generate", "--model", str(out / "pipeline"), "--steps", "2", "--out", str(image)])
    assert code == 0 and image.is_file()

    # the grid's masking row is the region edit a user runs: every pixel outside the centre is the source's
    from composer.pipelines import ComposerPipeline
    from composer.train.samples import centre_mask, grid_rows, held_out_batch

    cfg = make_config(shards, out)
    pipe = ComposerPipeline.from_pretrained(out / "pipeline", device="cpu")
    images, rows = grid_rows(pipe, held_out_batch(cfg, "cpu"))
    rows = dict(rows)
    outside = centre_mask(images) == 0
    assert set(rows) == {"all", "none", "palette", "sketch", "intensity", "masking"}
    masked = rows["masking"].float().cpu().expand_as(images)
    keep = outside.expand_as(images)
    assert torch.equal(masked[keep], images.cpu()[keep])
    assert not torch.equal(rows["palette"].float().cpu()[keep], images.cpu()[keep])


def test_resume_repeats_the_uninterrupted_run(shards, tmp_path):
    """Resuming from a mid-run checkpoint gives the same weights, LR, data order and losses as never stopping."""
    straight = tmp_path / "straight"
    cfg = make_config(shards, straight, total_images=32, checkpoint_every_images=16)
    full = train(cfg)
    assert [p.name for p in checkpoints(straight)] == ["checkpoint-000000000016", "checkpoint-000000000032"]

    resumed = tmp_path / "resumed"  # the same run, "interrupted" after its checkpoint at 16 images
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-000000000032")
    shutil.rmtree(resumed / "pipeline")
    cfg = make_config(shards, resumed, total_images=32, checkpoint_every_images=16, resume="auto")
    again = train(cfg)
    assert again["step"] == full["step"] == 8 and again["images_seen"] == 32
    assert again["losses"] == full["losses"][len(full["losses"]) - len(again["losses"]):]
    assert len(again["losses"]) == 4  # steps 5..8 only: the first four were not repeated
    last = "checkpoints/checkpoint-000000000032"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight / last / name), load_file(resumed / last / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key} differs")
    assert (json.loads((straight / last / "data_state_0.json").read_text())
            == json.loads((resumed / last / "data_state_0.json").read_text()))
    assert torch.load(straight / last / "scheduler.bin", weights_only=True) == torch.load(
        resumed / last / "scheduler.bin", weights_only=True)
    assert (straight / "losses.csv").read_text() == (resumed / "losses.csv").read_text()


def test_a_run_killed_with_sigkill_resumes_cleanly(shards, tmp_path):
    out = tmp_path / "killed"
    cfg = make_config(shards, out, total_images=4000, checkpoint_every_images=8, warmup_images=0)
    config_file = tmp_path / "killed.yaml"
    OmegaConf.save(cfg, config_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "composer", "train", "--config", str(config_file)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while len(checkpoints(out)) < 2 and time.time() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert len(checkpoints(out)) >= 2, "no checkpoint written within 240 s"
        time.sleep(0.37)  # somewhere inside a step or a checkpoint write
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    last = checkpoints(out)[-1]
    saved = json.loads((last / STATE_FILE).read_text())
    cfg = make_config(shards, out, total_images=saved["images_seen"] + 8, checkpoint_every_images=8,
                      warmup_images=0, resume="auto")
    summary = train(cfg)
    assert summary["images_seen"] == saved["images_seen"] + 8 and summary["step"] == saved["step"] + 2
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("checkpoint-")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    assert all((p / STATE_FILE).is_file() for p in (out / "checkpoints").iterdir())
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert main(["generate", "--model", str(out / "pipeline"), "--steps", "1", "--out", str(tmp_path / "k.png")]) == 0


def test_accelerate_launch_with_two_cpu_processes_trains_identical_replicas(shards, tmp_path):
    """The documented command: two real gloo processes, each on its share of the shards."""
    out = tmp_path / "ddp"
    cfg = make_config(shards, out, total_images=24)
    config_file = tmp_path / "ddp.yaml"
    OmegaConf.save(cfg, config_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29517", "-m", "composer", "train", "--config", str(config_file)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images_seen"] == 24 and summary["step"] == 3
    assert len(summary["replica_digests"]) == 2 and len(set(summary["replica_digests"])) == 1
    saved = json.loads((checkpoints(out)[-1] / STATE_FILE).read_text())
    assert saved["world_size"] == 2
    positions = [json.loads((checkpoints(out)[-1] / f"data_state_{r}.json").read_text()) for r in (0, 1)]
    assert [p["world_size"] for p in positions] == [2, 2]  # each process kept its own position in its shards
    assert [p["positions"] for p in positions] == [{"0": 12}, {"0": 12}]


@pytest.mark.parametrize("preset", ["train/tiny", "train/slots", "train/paper", "train/tiny-joint"])
def test_training_presets_fit_the_schema(preset):
    cfg = load_config([preset], [])
    assert cfg.data.resolution == 64 and cfg.train.total_images > 0
    assert cfg.sample.scheduler in ("ancestral", "ddim", "ddpm", "dpm++")
    if preset == "train/slots":
        assert cfg.decomposers.enabled == ["slots"]
    else:
        assert len(cfg.decomposers.enabled) == (9 if preset.endswith("joint") else 8)


def test_timestep_range_bounds_and_errors():
    from composer.train.loop import timestep_bounds

    assert timestep_bounds([0.0, 1.0], 1000) == (0, 1000)
    assert timestep_bounds([0.0, 0.3], 1000) == (0, 300)
    assert timestep_bounds([0.5, 0.5001], 1000) == (500, 501)
    for bad in ([0.5, 0.2], [0.0, 1.5], [0.1]):
        with pytest.raises(ValueError, match="train.timestep_range"):
            timestep_bounds(bad, 1000)


def test_loss_log_is_trimmed_to_the_resumed_position(tmp_path):
    from composer.train.loop import trim_loss_log

    log = tmp_path / "losses.csv"
    log.write_text("images_seen,loss\n16,0.5\n32,0.4\n48,0.3\n64,0.")  # the last line was cut by a crash
    trim_loss_log(log, 32)
    assert log.read_text() == "images_seen,loss\n16,0.5\n32,0.4\n"
    trim_loss_log(log, 0)  # a fresh run in the same folder starts a new log
    assert log.read_text() == "images_seen,loss\n"


def test_warm_start_loads_matching_tensors_and_names_bad_sources(shards, tmp_path):
    from composer.models.config import build_model
    from composer.train.module import TrainingModule
    from composer.train.warmstart import load_initial_weights
    from decomposers.set import DecomposerSet

    source = tmp_path / "source"
    train(make_config(shards, source))
    cfg = make_config(shards, tmp_path / "target")
    cfg.decomposers.enabled = ["palette", "sketch", "intensity", "masking", "depth"]  # one condition more
    decomposers = DecomposerSet(list(cfg.decomposers.enabled))
    module = TrainingModule(build_model(cfg.model, decomposers.specs()))
    report = load_initial_weights(module, source / "pipeline")
    assert "new (fresh)" in report and " 0 new" not in report
    reference = load_file(source / "pipeline" / "unet" / "composer_unet.safetensors")
    key = next(k for k in reference if "up_blocks" in k)
    torch.testing.assert_close(module.state_dict()[f"unet.{key}"], reference[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_initial_weights(module, tmp_path / "nowhere")


def test_condition_loss_script_reports_every_subset(shards, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from condition_loss import condition_errors
    finally:
        sys.path.pop(0)
    out = tmp_path / "run"
    cfg = make_config(shards, out)
    train(cfg)
    cfg.train.sample_shards = [shards]
    columns, rows = condition_errors(out / "pipeline", cfg, 4, [100, 900], uniform_draws=2)
    assert columns == ["t=100", "t=900", "t~U"]
    assert list(rows) == ["all", "none", "palette", "sketch", "intensity", "masking"]
    assert all(0.0 <= v <= 4.0 for values in rows.values() for v in values)
    assert rows["all"] != rows["none"]  # conditions reach the UNet's prediction


def test_the_last_partial_logging_window_reaches_the_loss_log(shards, tmp_path):
    out = tmp_path / "run"
    train(make_config(shards, out, log_every_steps=5))  # 2 steps: no full window of 5
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "images_seen,loss" and [r.split(",")[0] for r in rows[1:]] == ["8"]
