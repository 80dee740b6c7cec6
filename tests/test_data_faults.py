"""Data faults: a stream that cannot yield ends with one line (never hangs), loader workers die with their
parent, and commands that replace shards never destroy the old ones."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from composer.config import load_config
from composer.data.loader import DataStreamError, make_loader

ROOT = Path(__file__).resolve().parents[1]


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array, quality=90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _data(shards, *overrides):
    cfg = load_config([], ["data.shuffle_buffer=0", "data.resolution=8", "data.batch_size=2", *overrides])
    cfg.data.shards = [str(s) for s in shards]
    return cfg.data


@contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the stream hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


GOOD = _png(np.full((8, 8, 3), 120, np.uint8))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_all_corrupt_stream_ends_within_seconds_with_one_line(tmp_path, workers):
    shards = [_write_tar(tmp_path / f"bad-{i}.tar", [(f"k{i}{j}", {"png": b"\x89PNG not really"}) for j in range(5)])
              for i in range(2)]
    loader = make_loader(_data(shards, f"data.num_workers={workers}"), seed=0)  # streams forever
    start = time.perf_counter()
    with deadline(20), pytest.raises(DataStreamError) as caught:
        next(iter(loader))
    assert time.perf_counter() - start < 15
    message = str(caught.value)
    assert "\n" not in message and "no usable sample" in message
    assert "bad-" in message and f"corrupt {10 if workers == 0 else 5}" in message and "rewrite" in message
    assert isinstance(caught.value, ValueError)  # the CLI's one-line path


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_lacking_a_required_extra_name_the_member_and_the_fix(tmp_path, workers):
    # what the tiny preset does on ordinary img2dataset shards: data.extras names members they do not have
    shard = _write_tar(tmp_path / "00000.tar", [(f"{j:05d}", {"jpg": _jpeg(np.full((8, 8, 3), 90, np.uint8)),
                                                                 "txt": b"a photo", "json": b"{}"}) for j in range(4)])
    loader = make_loader(_data([shard], f"data.num_workers={workers}", "data.extras=[instances,classes,depth]"), seed=0)
    with deadline(20), pytest.raises(DataStreamError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "\n" not in message and "00000.tar" in message and "missing_member 4" in message
    assert "KEY.instances.png" in message and "data.extras=[]" in message and "precompute" in message
    assert loader.skipped() == {"missing_member": 4}


def test_a_long_run_of_bad_samples_stops_at_the_configured_bound(tmp_path):
    samples = [("good", {"png": GOOD})] + [(f"bad{j:03d}", {"png": b"junk"}) for j in range(40)]
    shard = _write_tar(tmp_path / "a.tar", samples)
    loader = make_loader(_data([shard], "data.max_consecutive_skips=10", "data.shuffle_shards=false"), seed=0)
    with deadline(20), pytest.raises(DataStreamError, match="10 samples in a row.*max_consecutive_skips=10"):
        list(loader)
    # 0 turns the bound off: the shard's one good sample keeps a forever-stream going
    loader = make_loader(_data([shard], "data.max_consecutive_skips=0", "data.batch_size=3"), seed=0)
    with deadline(20):
        batch = next(iter(loader))
    assert batch["key"] == ["good"] * 3


def test_a_finite_stream_that_yields_nothing_is_an_error_and_partial_badness_is_not(tmp_path):
    bad = _write_tar(tmp_path / "bad.tar", [("x", {"png": b"junk"})])
    (tmp_path / "notatar.tar").write_bytes(os.urandom(3000))
    with pytest.raises(DataStreamError, match="not readable tar files"):
        list(make_loader(_data([tmp_path / "notatar.tar"]), seed=0, epochs=1))
    with pytest.raises(DataStreamError, match="corrupt 1"):
        list(make_loader(_data([bad]), seed=0, epochs=1))
    empty = _write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(DataStreamError, match="hold no samples"):
        list(make_loader(_data([empty]), seed=0, epochs=1))
    good = _write_tar(tmp_path / "good.tar", [(f"g{j}", {"png": GOOD}) for j in range(3)])
    loader = make_loader(_data([bad, good], "data.num_workers=2"), seed=0, epochs=1)
    assert sum(len(b["key"]) for b in loader) == 3 and loader.skipped() == {"corrupt": 1}


def test_a_worker_with_only_bad_shards_does_not_stall_the_others_forever(tmp_path):
    good = _write_tar(tmp_path / "good.tar", [(f"g{j}", {"png": GOOD}) for j in range(4)])
    bad = _write_tar(tmp_path / "bad.tar", [(f"b{j}", {"png": b"junk"}) for j in range(4)])
    loader = make_loader(_data([good, bad], "data.num_workers=2", "data.shuffle_shards=false"), seed=0)
    with deadline(20), pytest.raises(DataStreamError, match="bad.tar"):
        for _batch in loader:
            pass


def test_a_missing_held_out_set_names_its_own_setting(tmp_path):
    data = _data([tmp_path / "nothing-*.tar"])
    with pytest.raises(ValueError, match="set train.sample_shards"):
        make_loader(data, seed=0, epochs=1, shards_key="train.sample_shards")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_loader_workers_die_with_their_parent(tmp_path):
    # one good sample among bad ones and a huge batch: the worker never fills a batch and never stops on its own
    shard = _write_tar(tmp_path / "a.tar", [("good", {"png": GOOD})] + [(f"b{j}", {"png": b"junk"}) for j in range(3)])
    script = textwrap.dedent(f"""
        import sys
        from composer.config import load_config
        from composer.data.loader import make_loader
        cfg = load_config([], ["data.shuffle_buffer=0", "data.resolution=8", "data.batch_size=100000000",
                               "data.num_workers=1"])
        cfg.data.shards = [{str(shard)!r}]
        print("ready", flush=True)
        next(iter(make_loader(cfg.data, seed=0)))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    workers: list[int] = []
    try:
        assert child.stdout.readline().strip() == b"ready"
        end = time.monotonic() + 30
        while not workers and time.monotonic() < end:
            time.sleep(0.1)
            workers = [p for p in _children(child.pid) if _alive(p)]
        assert workers, "the loader started no worker"
        time.sleep(0.3)
        child.kill()
        child.wait(10)
        end = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < end:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "a loader worker outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
