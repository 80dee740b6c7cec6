"""Checkpoints that prove themselves and an output_dir nobody clobbers: manifests, fallback on resume,
pruning, the run lock, refusing to start over a run, a full disk, non-finite weights, another process count."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer.train.checkpoint import (
    LEGACY,
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointStore,
    check_checkpoint,
    resolve_resume,
    write_manifest,
)
from composer.train.rundir import LOCK_FILE, RunError, RunLock


def _write_checkpoint(store: CheckpointStore, images: int, payload: str = "weights") -> Path:
    staging = store.staging(images)
    (staging / "model.safetensors").write_text(f"{payload}-{images}" * 50)
    (staging / STATE_FILE).write_text(json.dumps({"images_seen": images}))
    return store.commit(staging, images)


def _corrupt_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------------------------- without a model
def test_manifest_catches_truncation_and_same_size_corruption_and_auto_falls_back(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=3)
    a, b, c = (_write_checkpoint(store, images) for images in (8, 16, 24))
    assert all((p / MANIFEST_FILE).is_file() and check_checkpoint(p) is None for p in (a, b, c))
    _truncate(c / "model.safetensors")
    _corrupt_same_size(b / "model.safetensors")
    assert check_checkpoint(c).startswith("truncated: model.safetensors")
    assert check_checkpoint(b) == "checksum mismatch in model.safetensors"
    said: list[str] = []
    assert resolve_resume("auto", CheckpointStore(store.root), say=said.append) == a
    assert len(said) == 2 and "truncated" in said[0] and c.name in said[0] and "checksum" in said[1]
    with pytest.raises(ValueError, match="fails verification .*checksum mismatch.*--resume auto"):
        resolve_resume(str(b), CheckpointStore(store.root), say=said.append)
    (a / STATE_FILE).write_text("{}")  # edited after it was written
    with pytest.raises(ValueError, match="none of the 3 checkpoints .* verifies"):
        resolve_resume("auto", CheckpointStore(store.root), say=said.append)


def test_checkpoints_without_a_manifest_still_resume_and_are_said_once(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=3)
    for images in (8, 16):
        (_write_checkpoint(store, images) / MANIFEST_FILE).unlink()  # as the previous version wrote them
    said: list[str] = []
    assert resolve_resume("auto", CheckpointStore(store.root), say=said.append).name.endswith("16")
    assert said == [f"checkpoint-000000000016 has no {MANIFEST_FILE} ({LEGACY}): resuming it without verification"]
    # a new checkpoint on top of legacy ones: a manifest-less folder newer than it would be suspicious
    fresh = _write_checkpoint(store, 24)
    os.rename(fresh, fresh.with_name("checkpoint-000000000032"))
    (store.root / "checkpoint-000000000032" / MANIFEST_FILE).unlink()
    _write_checkpoint(store, 24)
    said.clear()
    assert resolve_resume("auto", CheckpointStore(store.root), say=said.append).name.endswith("24")
    assert said == [f"skipping {store.root / 'checkpoint-000000000032'}: missing {MANIFEST_FILE}"]


def test_pruning_never_deletes_the_newest_verified_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=1)
    _write_checkpoint(store, 8)
    newer = _write_checkpoint(CheckpointStore(tmp_path / "other", keep=1), 24)  # a broken one "from the future"
    shutil.move(newer, store.root / newer.name)
    _corrupt_same_size(store.root / newer.name / "model.safetensors")
    store = CheckpointStore(store.root, keep=1)  # a resumed run: it knows nothing yet
    _write_checkpoint(store, 16)
    assert [p.name[-2:] for _, p in store.complete()] == ["16", "24"]  # 8 pruned, 16 kept beside the broken 24
    assert store.newest_verified().name.endswith("16")
    # a broken checkpoint skipped on resume does not count towards keep; once older than a good one it goes
    store = CheckpointStore(tmp_path / "resumed", keep=2)
    for images in (8, 12):
        _write_checkpoint(store, images)
    _corrupt_same_size(store.root / "checkpoint-000000000012" / "model.safetensors")
    store = CheckpointStore(store.root, keep=2)
    assert resolve_resume("auto", store, say=lambda line: None).name.endswith("08")
    _write_checkpoint(store, 16)
    assert [p.name[-2:] for _, p in store.complete()] == ["08", "16"]


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    message = second.acquire()
    assert message and "in use by the trainer process" in message and str(os.getpid()) in message
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "somewhere", "started": "x"}))
    assert second.acquire() is None and "no longer running" in second.note
    second.release()


# ------------------------------------------------------------------------------------ with tiny runs
def make_config(shards: str, out: Path, **train):
    from test_training import make_config as tiny_config  # tests/ is on sys.path under pytest

    return tiny_config(shards, out, **train)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from composer.data.shards import write_scene_shards

    root = tmp_path_factory.mktemp("fault-scenes")
    write_scene_shards(root, 24, 64, seed=5, shard_size=12, progress=False)
    return str(root / "scenes-*.tar")


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):
    """A finished 2-step run with checkpoints at 4 and 8 images."""
    from composer.train.loop import train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(make_config(shards, out, checkpoint_every_images=4))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "checkpoint-000000000004", "checkpoint-000000000008"]
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _resumed_from(out: Path) -> str:
    return Path(json.loads((out / "run_summary.json").read_text())["resumed_from"]).name


@pytest.mark.parametrize("damage", [_truncate, _corrupt_same_size], ids=["truncated", "same-size-corrupted"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(shards, finished, tmp_path, capsys, damage):
    from composer.train.loop import train

    out = _copy(finished, tmp_path)
    damage(out / "checkpoints" / "checkpoint-000000000008" / "model.safetensors")
    summary = train(make_config(shards, out, checkpoint_every_images=4, total_images=12, resume="auto"))
    assert summary["images_seen"] == 12 and summary["step"] == 3
    assert _resumed_from(out) == "checkpoint-000000000004"
    printed = capsys.readouterr().out
    assert "skipping" in printed and "checkpoint-000000000008" in printed
    assert ("truncated" if damage is _truncate else "checksum mismatch") in printed
    for path in (out / "checkpoints").iterdir():  # 8 was written again, correctly
        assert check_checkpoint(path) is None


def test_a_legacy_checkpoint_that_fails_to_load_falls_back_instead_of_a_traceback(shards, finished, tmp_path,
                                                                                  capsys):
    from composer.train.loop import train

    out = _copy(finished, tmp_path)
    for path in (out / "checkpoints").iterdir():
        (path / MANIFEST_FILE).unlink(missing_ok=True)  # written by the previous version
    _truncate(out / "checkpoints" / "checkpoint-000000000008" / "model.safetensors")
    train(make_config(shards, out, checkpoint_every_images=4, total_images=12, resume="auto"))
    assert _resumed_from(out) == "checkpoint-000000000004"
    printed = capsys.readouterr().out
    assert "without verification" in printed and "cannot load it" in printed


def test_a_second_trainer_on_a_live_output_dir_is_refused(shards, finished, tmp_path):
    from composer.train.loop import train

    out = _copy(finished, tmp_path)
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "losses.csv")}
    live = RunLock(out)
    assert live.acquire() is None  # the first trainer
    try:
        with pytest.raises(RunError, match="is in use by the trainer process"):
            train(make_config(shards, out, checkpoint_every_images=4, total_images=12, resume="auto"))
    finally:
        live.release()
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_rerun_over_a_finished_run_without_resume_is_refused_until_overwrite(shards, finished, tmp_path,
                                                                              capsys):
    from omegaconf import OmegaConf

    from composer.cli import main
    from composer.train.loop import train

    out = _copy(finished, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config_file = tmp_path / "again.yaml"
    OmegaConf.save(make_config(shards, out, total_images=4), config_file)
    assert main(["train", "--config", str(config_file)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds a run" in error[0] and "--resume auto" in error[0] and "--overwrite" in error[0]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # losses.csv, config.yaml, checkpoints and pipeline untouched
    with pytest.raises(RunError, match="init_from=.* lies inside output_dir"):  # --overwrite would delete it
        train(make_config(shards, out, total_images=4, overwrite=True, init_from=str(out / "pipeline")))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    summary = train(make_config(shards, out, total_images=4, overwrite=True))
    assert summary["images_seen"] == 4
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000000000004"]
    assert (out / "losses.csv").read_text().splitlines()[1:] == [f"4,{summary['losses'][0][1]:.6f}"]
    assert OmegaConf.load(out / "config.yaml").train.overwrite is False  # a re-run of config.yaml is safe
    assert not (out / LOCK_FILE).exists()


def _enospc(filename):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


def _safetensors_enospc(filename):  # what safetensors raises on a really full disk (tmpfs, tried by hand)
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("failure", [_enospc, _safetensors_enospc], ids=["OSError", "SafetensorError"])
def test_a_full_disk_keeps_the_previous_checkpoint_loadable(shards, tmp_path, monkeypatch, failure):
    import composer.train.state as state_module
    from composer.train.loop import train

    real, calls = state_module.save_file, []

    def full_disk(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint: half a file, then ENOSPC
            Path(filename).write_bytes(b"\0" * 100)
            raise failure(filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(state_module, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="disk is full.*removed the partial checkpoint.*checkpoint-000000000004 is "
                                       "intact"):
        train(make_config(shards, out, checkpoint_every_images=4))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000000000004"]
    assert check_checkpoint(out / "checkpoints" / "checkpoint-000000000004") is None
    monkeypatch.setattr(state_module, "save_file", real)
    summary = train(make_config(shards, out, checkpoint_every_images=4, resume="auto"))
    assert summary["images_seen"] == 8 and _resumed_from(out) == "checkpoint-000000000004"


def test_non_finite_weights_stop_the_run_before_a_checkpoint_is_written(shards, tmp_path, monkeypatch):
    from composer.train.loop import train

    real, calls = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second update blows the weights up
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="weights are not finite at step 2 .*stopped without writing a checkpoint.*"
                                       "checkpoint-000000000004"):
        train(make_config(shards, out, checkpoint_every_images=4, keep_checkpoints=1))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000000000004"]
    state = load_file_state(out / "checkpoints" / "checkpoint-000000000004")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def load_file_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def test_resuming_under_another_process_count_is_refused_before_config_yaml_changes(shards, finished, tmp_path):
    from composer.train.loop import train

    out = _copy(finished, tmp_path)
    newest = out / "checkpoints" / "checkpoint-000000000008"
    saved = json.loads((newest / STATE_FILE).read_text())
    (newest / STATE_FILE).write_text(json.dumps(dict(saved, world_size=2)))  # as written by two processes
    (newest / MANIFEST_FILE).unlink(missing_ok=True)
    write_manifest(newest)
    before = (out / "config.yaml").read_bytes()
    with pytest.raises(RunError, match="world_size=2.*world_size=1.*same number of processes"):
        train(make_config(shards, out, checkpoint_every_images=4, total_images=12, resume="auto"))
    assert (out / "config.yaml").read_bytes() == before
    assert not (out / LOCK_FILE).exists()


def test_the_logged_loss_and_skip_counts_cover_every_process(monkeypatch):
    """Two processes, faked: this rank saw losses 1 and 3, the other 6 (one micro-batch) and other skips."""
    import accelerate.utils

    from composer.train.monitor import Monitor

    class TwoProcesses:
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + torch.tensor([6.0, 1.0], dtype=tensor.dtype)

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda parts: parts + [{"corrupt": 2, "no_caption": 1}])
    monitor = Monitor(None, enabled=True, progress=False, total_images=8, initial_images=0, accelerator=TwoProcesses())
    for loss in (1.0, 3.0):
        monitor.record_micro_batch(loss=loss, times={}, keep={})
    scalars = monitor.flush(step=1, images_seen=8, lr=1e-3, skipped_steps=0, loader_skipped={"corrupt": 1})
    assert scalars["train/loss"] == pytest.approx(10.0 / 3)  # the mean over all three micro-batches
    assert scalars["data/skipped/corrupt"] == 3 and scalars["data/skipped/no_caption"] == 1
    assert monitor.sum_over_processes({"corrupt": 1}) == {"corrupt": 3, "no_caption": 1}


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_continues(shards, tmp_path, monkeypatch, capsys):
    """A stop signal mid-run (SIGTERM, or Ctrl-C's SIGINT) is not a loss: the step under way ends, a checkpoint
    is written at that point (not at the next multiple of checkpoint_every_images), exit code 128 + 15."""
    import os
    import signal

    from composer.cli import main
    from composer.train.loop import Trainer, train

    out = tmp_path / "run"
    real, steps = Trainer.after_step, []

    def after_step(self):
        real(self)
        steps.append(self.state.step)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between two steps, as from `kill` or a scheduler

    monkeypatch.setattr(Trainer, "after_step", after_step)
    summary = train(make_config(shards, out, total_images=400, checkpoint_every_images=100))
    assert summary["stopped_by"] == "SIGTERM" and summary["exit_code"] == 143
    assert summary["step"] == 2 and summary["images_seen"] == 8
    assert [p.name for p in sorted((out / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-000000000008"]
    assert "--resume auto" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.setattr(Trainer, "after_step", real)
    resumed = train(make_config(shards, out, total_images=12, checkpoint_every_images=100, resume="auto"))
    assert _resumed_from(out) == "checkpoint-000000000008" and resumed["step"] == 3 and resumed["stopped_by"] is None
    # the command line: the same stop gives exit code 143 and says where it stopped
    from omegaconf import OmegaConf

    steps.clear()
    monkeypatch.setattr(Trainer, "after_step", after_step)
    OmegaConf.save(make_config(shards, tmp_path / "cli", total_images=400, checkpoint_every_images=100),
                   tmp_path / "cli.yaml")
    assert main(["train", "--config", str(tmp_path / "cli.yaml")]) == 143
    assert "stopped by SIGTERM at 8 images" in capsys.readouterr().out


def test_a_stop_signal_that_also_reaches_the_loader_workers_still_ends_in_a_checkpoint(shards, tmp_path, monkeypatch):
    """`pkill -f`, Ctrl-C (the whole process group) and schedulers signal the loader workers too; they ignore it,
    so the trainer's graceful stop is not turned into a crash by a dead worker."""
    import os
    import signal

    import psutil

    from composer.train.loop import Trainer, train

    real, steps = Trainer.after_step, []

    def after_step(self):
        real(self)
        steps.append(self.state.step)
        if len(steps) == 1:  # the workers first (a dead worker fails the next fetch beyond the prefetched batches)
            workers = psutil.Process().children(recursive=True)
            assert workers  # num_workers=1: the loader's worker process
            for child in workers:
                os.kill(child.pid, signal.SIGTERM)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "after_step", after_step)
    out = tmp_path / "run"
    cfg = make_config(shards, out, total_images=400, checkpoint_every_images=100)
    cfg.data.num_workers = 1
    summary = train(cfg)
    assert summary["stopped_by"] == "SIGTERM" and summary["images_seen"] == 20
    assert [p.name for p in sorted((out / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-000000000020"]
