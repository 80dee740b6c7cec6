"""The training bookkeeping that does not need a model: checkpoint store, LR schedule, EMA, step seeding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from composer.train.checkpoint import (
    STATE_FILE,
    CheckpointStore,
    publish_directory,
    recover_directory,
    resolve_resume,
)
from composer.train.ema import EMA
from composer.train.schedule import lr_factor, make_lr_scheduler
from composer.train.seeding import step_generator, step_seed


def _write_checkpoint(store: CheckpointStore, images: int, payload: str = "x") -> None:
    staging = store.staging(images)
    (staging / "weights.bin").write_text(payload)
    (staging / STATE_FILE).write_text("{}")
    store.commit(staging, images)


def test_store_keeps_last_k_and_ignores_incomplete_folders(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    assert store.latest() is None
    for images in (64, 128, 192):
        _write_checkpoint(store, images)
    assert [i for i, _ in store.complete()] == [128, 192]
    # leftovers of a killed run: a half-written temporary folder and a half-deleted old checkpoint
    (store.staging(256) / "weights.bin").write_text("partial")
    (tmp_path / "checkpoints" / "trash-000000000064").mkdir()
    # and a folder with a checkpoint name but no state file (never produced by commit, but be strict)
    (tmp_path / "checkpoints" / "checkpoint-000000000999").mkdir()
    assert store.latest().name == "checkpoint-000000000192"
    removed = {p.name for p in store.remove_leftovers()}
    assert removed == {"tmp-000000000256", "trash-000000000064"}
    assert resolve_resume("auto", store).name == "checkpoint-000000000192"
    assert resolve_resume(None, store) is None
    assert resolve_resume(str(tmp_path), store).name == "checkpoint-000000000192"  # an output_dir works too


def test_commit_refuses_incomplete_staging_and_resume_refuses_bad_paths(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=1)
    staging = store.staging(8)
    with pytest.raises(RuntimeError, match=STATE_FILE):
        store.commit(staging, 8)
    assert store.complete() == []
    with pytest.raises(FileNotFoundError, match="auto"):
        resolve_resume(str(tmp_path / "nope"), store)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(staging), store)


def test_publish_directory_replaces_and_recovers(tmp_path):
    final = tmp_path / "pipeline"
    for version in ("one", "two"):
        staging = tmp_path / f"pipeline.tmp-{version}"
        staging.mkdir()
        (staging / "model.txt").write_text(version)
        publish_directory(staging, final)
        assert (final / "model.txt").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    # killed between the two renames: only pipeline.old exists, plus a temporary folder
    final.rename(tmp_path / "pipeline.old")
    (tmp_path / "pipeline.tmp-three").mkdir()
    recover_directory(final)
    assert (final / "model.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_lr_factor_warmup_then_constant_or_cosine():
    kwargs = dict(warmup_images=100, total_images=1100)
    warm = [lr_factor(i, **kwargs) for i in range(0, 101, 10)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert 0 < warm[0] < 0.02 and warm[-1] == 1.0
    assert lr_factor(5000, **kwargs) == 1.0
    assert lr_factor(600, schedule="cosine", **kwargs) == pytest.approx(0.5)
    assert lr_factor(1100, schedule="cosine", min_factor=0.1, **kwargs) == pytest.approx(0.1)
    assert lr_factor(10_000, schedule="cosine", **kwargs) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, schedule="linear", **kwargs)


def test_lr_scheduler_follows_images_seen_and_restores():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    kwargs = dict(images_per_step=16, warmup_images=64, total_images=256, schedule="cosine")
    scheduler = make_lr_scheduler(optimizer, **kwargs)
    for step in range(10):
        expected = 1e-3 * lr_factor(step * 16, warmup_images=64, total_images=256, schedule="cosine")
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler2 = make_lr_scheduler(optimizer2, **kwargs)
    scheduler2.load_state_dict(state)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_ema_matches_closed_form_and_round_trips():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, warmup=False)
    start = model[0].weight.detach().clone()
    targets = [torch.full_like(start, float(k)) for k in (1, 2, 3)]
    expected = start.clone()
    for target in targets:
        with torch.no_grad():
            model[0].weight.copy_(target)
        model[1].num_batches_tracked += 1
        ema.update(model)
        expected = 0.9 * expected + 0.1 * target
    assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-6)
    assert int(ema.shadow["1.num_batches_tracked"]) == 3  # integer buffers are copied, not averaged
    other = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema.copy_to(other)
    assert torch.allclose(other[0].weight, expected, atol=1e-6)
    restored = EMA(other, decay=0.9, warmup=False)
    restored.load_state_dict(ema.state_dict(), ema.updates)
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="does not match"):
        restored.load_state_dict({"0.weight": expected}, 1)


def test_ema_warmup_decay_starts_small():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(nn.Linear(2, 2), decay=1.0)


def test_step_seed_depends_on_every_part_and_is_reproducible():
    seeds = {step_seed(s, r, i) for s in range(3) for r in range(3) for i in (0, 8, 16)}
    assert len(seeds) == 27
    assert all(0 <= s < 2**63 for s in seeds)
    a = torch.randn(4, generator=step_generator(1, 0, 64))
    b = torch.randn(4, generator=step_generator(1, 0, 64))
    assert torch.equal(a, b)
    assert not math.isclose(float(a[0]), float(torch.randn(1, generator=step_generator(1, 1, 64))[0]))
