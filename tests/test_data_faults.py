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


# --- writes that cannot destroy ---------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"p{i}.jpg").write_bytes(_jpeg(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)))
        (folder / f"p{i}.txt").write_text(f"photo {i}")
    return folder


def test_a_failing_scenes_overwrite_keeps_the_old_shards_byte_identical(tmp_path, monkeypatch):
    import composer.data.shards as shards_module
    from composer.cli import main

    out = tmp_path / "scenes"
    assert main(["scenes", "--num", "3", "--out", str(out), "--shard-size", "2"]) == 0
    before = _snapshot(out)
    real = shards_module.generate_scene

    def fails_on_the_third(seed, index, *args, **kwargs):
        if index == 2:
            raise ValueError("scene 2 cannot be rendered")
        return real(seed, index, *args, **kwargs)

    monkeypatch.setattr(shards_module, "generate_scene", fails_on_the_third)
    assert main(["scenes", "--num", "5", "--out", str(out), "--shard-size", "2", "--overwrite", "--seed", "7"]) == 2
    assert _snapshot(out) == before  # the old shards, and nothing else (no temporary folder left)
    monkeypatch.setattr(shards_module, "generate_scene", real)
    # a successful overwrite with fewer shards replaces them all: no old shard is left to mix in
    assert main(["scenes", "--num", "1", "--out", str(out), "--overwrite", "--seed", "7"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scenes-000000.tar"]
    assert _snapshot(out)["scenes-000000.tar"] != before["scenes-000000.tar"]


def test_a_failing_shards_overwrite_keeps_the_old_shards(tmp_path, capsys):
    from composer.cli import main

    photos = _photos(tmp_path / "photos")
    out = tmp_path / "shards"
    assert main(["shards", str(photos), "--out", str(out)]) == 0
    before = _snapshot(out)
    (photos / "p1.txt").write_bytes(b"\xff\xfe not utf-8 \x80")  # one undecodable caption
    capsys.readouterr()
    assert main(["shards", str(photos), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()[-1]  # after the progress bar
    assert err.startswith("composer-diffusion shards: error:") and "p1.txt" in err and "UTF-8" in err
    assert _snapshot(out) == before
    # a bad argument is refused before anything is touched
    assert main(["shards", str(photos), "--out", str(out), "--overwrite", "--shard-size", "0"]) == 2
    assert "--shard-size" in capsys.readouterr().err
    assert _snapshot(out) == before
    # a folder whose files are all unreadable replaces nothing either
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    assert main(["shards", str(junk), "--out", str(out), "--overwrite"]) == 2
    assert _snapshot(out) == before


def test_shards_leave_out_a_truncated_jpeg_whose_header_decodes(tmp_path, capsys):
    from composer.cli import main

    photos = _photos(tmp_path / "photos", 2)
    whole = (photos / "p1.jpg").read_bytes()
    (photos / "p1.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # the header (and size) still read
    with Image.open(photos / "p1.jpg") as image:
        assert image.size == (32, 24)
    assert main(["shards", str(photos), "--out", str(tmp_path / "out")]) == 0
    assert "skipped 1" in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "images-000000.tar") as tar:
        names = tar.getnames()
    assert "000000000.jpg" in names and not any(n.startswith("000000001.") for n in names)


def _precompute_input(tmp_path: Path) -> Path:
    from composer.data.shards import write_scene_shards

    write_scene_shards(tmp_path / "in", 4, 64, seed=1, shard_size=2, progress=False)
    return tmp_path / "in"


def _fails(run, words: str) -> bool:
    """The command failed with ``words``: a non-zero exit (the CLI's one line) or the exception itself."""
    try:
        return run() != 0
    except RuntimeError as error:
        return words in str(error)


def test_a_failing_precompute_keeps_the_old_output_and_leaves_no_partial(tmp_path, monkeypatch):
    from composer.cli import main
    from decomposers.set import DecomposerSet

    source = _precompute_input(tmp_path)
    out = tmp_path / "pre"
    args = ["precompute", "--shards", str(source / "scenes-*.tar"), "--only", "palette", "--out", str(out),
            "--batch-size", "1"]
    assert main(args) == 0
    before = _snapshot(out)
    assert sorted(before) == ["scenes-000000.tar", "scenes-000001.tar"]
    assert main(args) == 2  # existing outputs are replaced only with --overwrite
    real, calls = DecomposerSet.decompose, []

    def fails_on_the_third_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("decomposer crashed")
        return real(self, *a, **k)

    monkeypatch.setattr(DecomposerSet, "decompose", fails_on_the_third_batch)
    # in the second shard, the first done
    assert _fails(lambda: main([*args, "--overwrite", "--only", "palette,sketch"]), "decomposer crashed")
    assert _snapshot(out) == before  # no .partial, no temporary folder, old shards as they were
    # into a fresh folder: a failure leaves no folder at all
    calls.clear()
    assert _fails(lambda: main([*args[:-3], str(tmp_path / "fresh"), "--batch-size", "1"]), "decomposer crashed")
    assert not (tmp_path / "fresh").exists()


def test_precompute_validates_before_writing_and_names_an_unreadable_shard(tmp_path, capsys):
    from composer.cli import main

    source = _precompute_input(tmp_path)
    out = tmp_path / "pre"
    base = ["precompute", "--shards", str(source / "scenes-*.tar"), "--out", str(out)]
    for bad in (["--only", "palette", "--batch-size", "0"], ["--only", " , "], ["--only", "palette", "--device", "gpu9"]):
        assert main([*base, *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not out.exists()
    (tmp_path / "broken.tar").write_bytes(os.urandom(3000))  # not a tar at all
    assert main(["precompute", "--shards", str(source / "scenes-000000.tar"), "--shards", str(tmp_path / "broken.tar"),
                 "--only", "palette", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.tar" in err and "cannot be read" in err
    assert not out.exists()
    # a corrupt ground-truth member is one skipped sample, not a crash
    with tarfile.open(source / "scenes-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    first = sorted(members)[0].split(".")[0]
    members[f"{first}.instances.png"] = b"\x89PNG broken"
    with tarfile.open(tmp_path / "gt.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(["precompute", "--shards", str(tmp_path / "gt.tar"), "--only", "palette", "--out", str(out)]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out
    # a shard whose every sample is unreadable is not written (no empty tar); all of them: an error, no output
    for name in members:
        if name.endswith(".instances.png"):
            members[name] = b"\x89PNG broken"
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    both = tmp_path / "both"
    assert main(["precompute", "--shards", str(tmp_path / "gt.tar"), "--shards", str(tmp_path / "bad.tar"),
                 "--only", "palette", "--out", str(both)]) == 0
    assert "1 shard(s) had no readable sample" in capsys.readouterr().out
    assert sorted(p.name for p in both.iterdir()) == ["gt.tar"]
    assert main(["precompute", "--shards", str(tmp_path / "bad.tar"), "--only", "palette",
                 "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no readable sample" in err
    assert not (tmp_path / "none").exists()


# --- configuration and the photos preset ------------------------------------------------------------------

def test_a_plain_string_sets_a_list_of_shards():
    cfg = load_config([], ["data.shards=/x.tar", "train.sample_shards=/held/{000..003}.tar"])
    assert list(cfg.data.shards) == ["/x.tar"] and list(cfg.train.sample_shards) == ["/held/{000..003}.tar"]
    assert list(load_config([], ["data.shards=*.tar"]).data.shards) == ["*.tar"]
    assert list(load_config([], ["data.shards={a,b}.tar"]).data.shards) == ["{a,b}.tar"]
    with pytest.raises(ValueError, match="data.resolution"):
        load_config([], ["data.resolution=/x.tar"])


def _img2dataset_shard(path: Path, count: int = 6) -> Path:
    """A shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json (and no ground-truth maps)."""
    rng = np.random.default_rng(5)
    samples = []
    for i in range(count):
        key = f"{i:09d}"
        height, width = (48, 72) if i % 2 else (80, 60)  # photos are not square
        meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success", "caption": f"photo {i}",
                "width": width, "height": height, "original_width": width * 4, "original_height": height * 4}
        samples.append((key, {"jpg": _jpeg(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)),
                              "txt": f"photo {i}".encode(), "json": json.dumps(meta).encode()}))
    return _write_tar(path, samples)


def test_the_tiny_preset_on_img2dataset_shards_says_what_to_do(tmp_path):
    shard = _img2dataset_shard(tmp_path / "00000.tar")
    cfg = load_config(["train/tiny"], [f"data.shards={shard}", "data.num_workers=0"])
    with deadline(20), pytest.raises(DataStreamError, match=r"KEY\.instances\.png.*data\.extras=\[\]"):
        next(iter(make_loader(cfg.data, seed=0)))


def test_the_photos_preset_trains_on_img2dataset_shards_with_one_setting(tmp_path, monkeypatch):
    from test_training import TINY_UNET

    from composer.train.loop import train

    shard = _img2dataset_shard(tmp_path / "00000.tar")
    monkeypatch.chdir(tmp_path)  # the preset's asset paths resolve from anywhere
    cfg = load_config(["train/photos"], [f"data.shards={shard}"])  # the one setting a user gives
    assert list(cfg.data.extras) == [] and "depth" not in cfg.decomposers.enabled
    assert "instances" not in cfg.decomposers.enabled and cfg.train.sample_shards is None
    batch = next(iter(make_loader(cfg.data, seed=0)))
    assert batch["image"].shape == (16, 3, 64, 64) and batch["caption"][0].startswith("photo")
    # two steps, with the tiny test UNet at 32 px to stay fast
    cfg.output_dir = str(tmp_path / "run")
    cfg.data.resolution, cfg.data.batch_size, cfg.data.num_workers = 32, 2, 0
    cfg.model.overrides = dict(TINY_UNET)
    cfg.sample.steps = 1  # the final sample grid
    for key, value in dict(total_images=4, sample_images=2, warmup_images=2, checkpoint_every_images=0, sample_every_images=0,
                           progress=False, tensorboard=False, mixed_precision="no", log_every_steps=1).items():
        cfg.train[key] = value
    summary = train(cfg)
    assert summary["step"] == 2 and summary["skipped_steps"] == 0
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_a_script_that_stops_reading_a_loader_exits(tmp_path):
    # a user's script takes a few batches at module level and ends: its workers ignore SIGTERM (so a signal to
    # the whole group cannot crash a trainer), so multiprocessing's exit hook alone (terminate + join) would wait
    # for them forever; the loader must stop its live workers itself when the interpreter exits
    shard = _write_tar(tmp_path / "a.tar", [(f"k{j}", {"png": GOOD}) for j in range(8)])
    script = textwrap.dedent(f"""
        from composer.config import load_config
        from composer.data.loader import make_loader
        cfg = load_config([], ["data.shuffle_buffer=0", "data.resolution=8", "data.batch_size=2",
                               "data.num_workers=1"])
        cfg.data.shards = [{str(shard)!r}]
        batches = iter(make_loader(cfg.data, seed=0))  # streams forever: never exhausted
        print(tuple(next(batches)["image"].shape), flush=True)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        out, _ = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail("the script never exited: the loader's worker kept its interpreter waiting at exit")
    assert child.returncode == 0
    assert out.strip() == b"(2, 3, 8, 8)"
