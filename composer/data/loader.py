"""Streaming webdataset shards into training batches, skipping (and counting) bad samples.

    loader = make_loader(cfg.data, seed=0)            # rank / world size from torch.distributed if set
    for batch in loader:
        batch["image"]     # (B, 3, R, R) float32 in [0, 1]
        batch["caption"]   # list[str], "" when the sample has no .txt
        batch["key"], batch["meta"]
        batch["depth"]     # and any other name listed in data.extras, transformed like the image
    loader.skipped()       # {"corrupt": 2, "missing_member": 1, ...}
    loader.state_dict()    # data position, for exact resume: make_loader(..., state=...)

Order. Each epoch permutes the shard list with a generator seeded by (seed, epoch); shards are split by
node (rank::world_size) and then by data-loader worker; each worker streams its shards through a shuffle
buffer seeded by (seed, rank, worker, epoch). PyTorch's DataLoader takes batches from the workers in a
fixed round-robin, so the whole stream is a deterministic function of the seed, the world size and the
number of workers.

Data position. Every batch carries, per worker, how many raw samples that worker has drawn from its
shuffle buffer so far. ``state_dict()`` returns those counts for the batches *consumed*; a loader made with
``state=`` skips exactly that many raw samples per worker before decoding anything, so a resumed run sees
the same batches the uninterrupted run would have seen (with the same number of workers).

No silent hang. A stream that streams forever stops with a ``DataStreamError`` (a ValueError: one line naming
the shards, the skip counts by reason and the fix) when one worker's whole pass over its shards yields no
usable sample, or after ``data.max_consecutive_skips`` skipped samples in a row; a finite stream raises it when
it yields no batch at all. Loader workers are killed when their parent process dies (Linux).
"""

from __future__ import annotations

import atexit
import functools
import glob
import itertools
import multiprocessing.util  # noqa: F401  (its exit hook is registered first, so ours runs before it)
import os
import re
import signal
import sys
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from composer.data.config import DataConfig
from composer.data.decode import SampleError, decode_map, decode_npy, decode_rgb, find_image_member

INTEGER_MAPS = ("instances", "classes")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class DataStreamError(ValueError):
    """The stream cannot produce batches (every sample skipped); the message is one line with the fix."""


class _MissingMember(SampleError):
    def __init__(self, key: str, name: str):
        super().__init__("missing_member", f"sample {key} has no {name}.png/.npy")
        self.member = name


def _die_with_parent(parent: int, worker_id: int) -> None:
    """worker_init_fn: a loader worker gets SIGKILL when the process that started it dies, and ignores SIGINT
    and SIGTERM: Ctrl-C reaches the whole process group and `pkill -f`/schedulers signal every process, and a
    worker killed by them would crash the trainer (torch's SIGCHLD check) before its graceful stop could write
    a checkpoint. The trainer ends its workers itself, or they die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this libc: the parent check below still runs
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


# Worker iterators still running. The workers ignore SIGTERM (above), so multiprocessing's own exit hook, which
# terminates daemonic children and then joins them, would wait forever for the workers of a loader a script
# stopped reading; this hook, registered after it and so run before it, stops them the way the trainer does.
_LIVE_WORKERS: weakref.WeakSet = weakref.WeakSet()


def _stop_workers(items: Any) -> None:
    """End the worker processes of a DataLoader iterator (a no-op for one without workers)."""
    shutdown = getattr(items, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    _LIVE_WORKERS.discard(items)


@atexit.register
def _stop_live_workers() -> None:
    for items in list(_LIVE_WORKERS):
        _stop_workers(items)


def _fix_for(reason: str, missing: dict[str, int], cfg: DataConfig, shards_key: str) -> str:
    if reason == "missing_member":
        name = max(missing, key=missing.get) if missing else "?"
        source = "instances" if name == "classes" else name
        return (f"samples lack KEY.{name}.png/.npy: precompute it (composer-diffusion precompute --only {source}) "
                f"or remove {name} from data.extras (data.extras=[] reads no extra members)")
    if reason == "missing_image":
        return "samples have no image member (KEY.jpg/.png/.webp): check the shards' layout (KEY.jpg + KEY.txt)"
    if reason == "too_large":
        return (f"images exceed data.max_image_pixels={cfg.max_image_pixels}: raise it or store smaller images")
    if reason == "corrupt_shard":
        return f"the shards are not readable tar files: check {shards_key} and rewrite the broken shards"
    if reason == "corrupt":
        return ("images or members do not decode: check the shards (open a few members) and rewrite them "
                "(composer-diffusion shards / scenes)")
    return f"check {shards_key} and the shards' members"


def _stream_error(what: str, shards: list[str], counts: dict[str, int], missing: dict[str, int], cfg: DataConfig,
                  shards_key: str, consecutive: bool = False) -> str:
    shown = ", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")
    where = f"{len(shards)} shard{'s' if len(shards) != 1 else ''} ({shown})"
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return f"{what} {where}: they hold no samples; check {shards_key}"
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    reason = max(counts, key=counts.get)
    fix = _fix_for(reason, missing, cfg, shards_key)
    if consecutive:
        fix += f" (data.max_consecutive_skips={cfg.max_consecutive_skips} allows longer runs of bad samples)"
    return f"{what} {where}; skipped {skipped}; {fix}"


def expand_shards(patterns: list[str] | str) -> list[str]:
    """Expand brace patterns and local globs into a list of shard URLs, in order, without duplicates."""
    from braceexpand import braceexpand

    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand(str(pattern)):
            is_local = not _SCHEME.match(item) or item.startswith("file:")
            path = item[5:] if item.startswith("file:") else item
            if is_local and any(c in path for c in "*?["):
                urls += sorted(glob.glob(path))
            else:
                urls.append(item)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def _check_shards(urls: list[str], patterns: Any, key: str = "data.shards") -> None:
    if not urls:
        raise ValueError(
            f"no shards match {list(patterns) if not isinstance(patterns, str) else patterns}; set {key} "
            "to tar paths, globs or brace patterns (make some with `composer-diffusion scenes --out DIR`)"
        )
    missing = [u for u in urls if not _SCHEME.match(u) and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); check {key}"
        )


class ShardStream(IterableDataset):
    """The per-worker stream of batches; use ``make_loader`` rather than this class directly."""

    def __init__(
        self,
        urls: list[str],
        cfg: DataConfig,
        *,
        seed: int,
        rank: int,
        world_size: int,
        epochs: int | None,
        start_positions: dict[int, int] | None = None,
        shards_key: str = "data.shards",
    ):
        super().__init__()
        self.urls, self.cfg, self.seed, self.rank, self.world_size = urls, cfg, seed, rank, world_size
        self.epochs = epochs
        self.shards_key = shards_key
        self.start_positions = dict(start_positions or {})

    def epoch_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        urls = list(self.urls)
        if self.cfg.shuffle_shards:
            order = np.random.default_rng([self.seed, epoch, 7919]).permutation(len(urls))
            urls = [urls[i] for i in order]
        return urls[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counters: Counter = Counter()
        missing: Counter = Counter()  # extra member -> samples that lack it
        drawn = 0
        skip = self.start_positions.get(worker, 0)
        items: list[dict[str, Any]] = []
        limit = max(0, int(self.cfg.max_consecutive_skips))
        consecutive = 0

        def flush() -> dict[str, Any]:
            batch = _collate(items)
            batch.update(_worker=worker, _position=drawn, _skipped=dict(counters))
            items.clear()
            return batch

        def failure(what: str, shards: list[str], by_count: bool = False) -> dict[str, Any]:
            message = _stream_error(what, shards, dict(counters), dict(missing), self.cfg, self.shards_key, by_count)
            return {"_error": message, "_worker": worker, "_position": drawn, "_skipped": dict(counters)}

        epochs = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            shards = self.epoch_shards(epoch, worker, num_workers)
            if not shards:
                break
            usable, resumed = 0, False
            for sample in self._shuffled(self._raw_samples(shards, counters), epoch, worker):
                drawn += 1
                if drawn <= skip:
                    resumed = True
                    continue  # resuming: this sample was consumed before the checkpoint
                try:
                    items.append(self._decode(sample, drawn, worker))
                except SampleError as error:
                    counters[error.reason] += 1
                    if isinstance(error, _MissingMember):
                        missing[error.member] += 1
                    consecutive += 1
                    if limit and consecutive >= limit:
                        yield failure(f"{consecutive} samples in a row were skipped in", sorted(shards), True)
                        return
                    continue
                usable += 1
                consecutive = 0
                if len(items) == self.cfg.batch_size:
                    yield flush()
            if self.epochs is None and not usable and not resumed:  # streaming forever would yield nothing
                yield failure("no usable sample in a whole pass over", sorted(shards))
                return
        if items:
            yield flush()
        yield {"_stats_only": True, "_worker": worker, "_position": drawn, "_skipped": dict(counters),
               "_missing": dict(missing)}

    def _raw_samples(self, shards: list[str], counters: Counter) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        def handler(error: Exception) -> bool:
            counters["corrupt_shard"] += 1
            return True  # skip the rest of a broken shard, go on with the next

        stream = url_opener(({"url": url} for url in shards), handler=handler)
        stream = tar_file_expander(stream, handler=handler)
        yield from group_by_keys(stream, handler=handler)

    def _shuffled(self, samples: Iterator[dict[str, Any]], epoch: int, worker: int) -> Iterator[dict[str, Any]]:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        rng = np.random.default_rng([self.seed, self.rank, worker, epoch, 104729])
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= size:
                index = int(rng.integers(len(buffer)))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        while buffer:
            index = int(rng.integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()

    def _decode(self, sample: dict[str, Any], drawn: int, worker: int) -> dict[str, Any]:
        cfg = self.cfg
        image = decode_rgb(sample[find_image_member(sample)], cfg.max_image_pixels)
        maps: dict[str, torch.Tensor] = {}
        for name in cfg.extras:
            maps[name] = self._decode_extra(sample, name)
        rng = np.random.default_rng([self.seed, self.rank, worker, drawn])
        image, maps = _resize_crop(image, maps, cfg.resolution, cfg.crop, rng)
        if cfg.crop_size:
            image, maps = _sub_crop(image, maps, int(cfg.crop_size), cfg.crop, rng)
        caption = sample.get("txt", b"")
        meta: dict[str, Any] = {}
        if "json" in sample:
            import json

            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError):
                raise SampleError("corrupt", "unreadable json member") from None
        try:
            caption = caption.decode("utf-8").strip() if isinstance(caption, bytes) else str(caption)
        except UnicodeDecodeError:
            raise SampleError("corrupt", "caption is not utf-8") from None
        return {"image": image, "caption": caption, "key": sample.get("__key__", ""), "meta": meta, **maps}

    def _decode_extra(self, sample: dict[str, Any], name: str) -> torch.Tensor:
        limit = self.cfg.max_image_pixels
        if f"{name}.npy" in sample:
            array = decode_npy(sample[f"{name}.npy"])
        elif f"{name}.png" in sample:
            array = decode_map(sample[f"{name}.png"], limit)
            if name not in INTEGER_MAPS:  # a quantised float map (depth): back to [0, 1]
                array = array.astype(np.float32) / (65535.0 if array.dtype == np.uint16 else 255.0)
        else:
            raise _MissingMember(str(sample.get("__key__")), name)
        if array.ndim == 2:
            array = array[None]
        if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            return torch.from_numpy(array.astype(np.int64))
        return torch.from_numpy(array.astype(np.float32))


def _resize_crop(
    image: torch.Tensor, maps: dict[str, torch.Tensor], resolution: int, crop: str, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Resize the shorter side to ``resolution`` and crop a square; spatial maps get the same geometry."""
    _, height, width = image.shape
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    if crop == "random":
        top, left = int(rng.integers(new_h - resolution + 1)), int(rng.integers(new_w - resolution + 1))
    elif crop == "center":
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        raise ValueError(f"data.crop must be 'center' or 'random', got {crop!r}")

    def geometry(t: torch.Tensor, integer: bool) -> torch.Tensor:
        if (t.shape[-2], t.shape[-1]) != (new_h, new_w):
            if integer:
                t = F.interpolate(t[None].float(), size=(new_h, new_w), mode="nearest-exact")[0].long()
            else:
                t = F.interpolate(t[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
        return t[..., top : top + resolution, left : left + resolution].contiguous()

    image = geometry(image, False).clamp_(0.0, 1.0)
    out = {}
    for name, value in maps.items():
        if value.ndim == 1:
            out[name] = value
        else:
            out[name] = geometry(value, not value.is_floating_point())
    return image, out


def _sub_crop(image: torch.Tensor, maps: dict[str, torch.Tensor], size: int, crop: str,
              rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A size x size crop of a (C, R, R) image (random or centred); spatial maps get the same window."""
    height, width = image.shape[-2:]
    if crop == "random":
        top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    window = (slice(top, top + size), slice(left, left + size))
    out = {name: value if value.ndim == 1 else value[..., window[0], window[1]].contiguous() for name, value in maps.items()}
    return image[..., window[0], window[1]].contiguous(), out


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for name in items[0]:
        values = [item[name] for item in items]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class Loader:
    """Iterable of batches over a ShardStream, with skip counts and data position in the main process."""

    def __init__(self, dataset: ShardStream, num_workers: int):
        self.dataset = dataset
        self.num_workers = num_workers
        self._positions: dict[int, int] = dict(dataset.start_positions)
        self._skipped: dict[int, dict[str, int]] = {}
        self._next_worker = int(getattr(dataset, "next_worker", 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None,
            worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if self.num_workers else None,
        )
        # Batches are re-sequenced strictly round-robin over the workers that still have data, starting
        # from the worker due next; this makes the order independent of where a resumed run starts.
        workers = max(1, self.num_workers)
        queues: dict[int, deque] = {w: deque() for w in range(workers)}
        done: set[int] = set()
        missing: Counter = Counter()
        items = iter(loader)
        if self.num_workers:
            _LIVE_WORKERS.add(items)
        try:
            yield from self._sequence(items, queues, done, workers, missing)
        finally:  # stop the workers now, also when the stream fails (the traceback would keep them alive)
            _stop_workers(items)
        self._next_worker = 0

    def _sequence(self, items, queues, done, workers, missing) -> Iterator[dict[str, Any]]:
        yielded = 0
        for item in items:
            if "_error" in item:
                self._skipped[item["_worker"]] = item["_skipped"]
                raise DataStreamError(item["_error"])
            queues[item["_worker"]].append(item)
            while len(done) < workers:
                worker = self._next_worker
                if worker in done:
                    self._next_worker = (worker + 1) % workers
                    continue
                if not queues[worker]:
                    break
                batch = queues[worker].popleft()
                self._positions[worker] = batch.pop("_position")
                self._skipped[worker] = batch.pop("_skipped")
                batch.pop("_worker")
                missing.update(batch.pop("_missing", {}))
                if batch.pop("_stats_only", False):
                    done.add(worker)
                    continue
                self._next_worker = (worker + 1) % workers
                yielded += 1
                yield batch
        if not yielded and not any(self.dataset.start_positions.values()):
            ds = self.dataset
            raise DataStreamError(_stream_error("no usable sample in", list(ds.urls), self.skipped(), dict(missing),
                                                ds.cfg, ds.shards_key))

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by reason (summed over workers)."""
        total: Counter = Counter()
        for counts in self._skipped.values():
            total.update(counts)
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last consumed batch (JSON-serialisable)."""
        return {"positions": {str(k): v for k, v in self._positions.items()}, "next_worker": self._next_worker,
                "num_workers": self.num_workers,
                "world_size": self.dataset.world_size, "seed": self.dataset.seed}


def make_loader(
    cfg: DataConfig,
    *,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
    epochs: int | None = None,
    state: dict[str, Any] | None = None,
    shards_key: str = "data.shards",
) -> Loader:
    """A Loader over ``cfg.shards`` for this process (rank of world_size; torch.distributed by default).

    epochs=None streams forever (reshuffling shards each epoch). state: a ``Loader.state_dict()`` to
    resume from (the same seed, world size and number of workers are required). shards_key: the setting
    that errors name for the shard list (e.g. "train.sample_shards" for a held-out set).
    """
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    shards = [cfg.shards] if isinstance(cfg.shards, str) else list(cfg.shards)
    urls = expand_shards(shards)
    _check_shards(urls, shards, shards_key)
    workers = max(1, cfg.num_workers)
    if len(urls) < world_size * workers:
        raise ValueError(
            f"{len(urls)} shards cannot feed {world_size} processes x {workers} workers without duplicates; "
            "write more, smaller shards (--shard-size) or lower data.num_workers"
        )
    if cfg.resolution < 8:
        raise ValueError(f"data.resolution must be at least 8, got {cfg.resolution}")
    if cfg.crop_size is not None and not 8 <= int(cfg.crop_size) <= cfg.resolution:
        raise ValueError(f"data.crop_size must lie between 8 and data.resolution ({cfg.resolution}), got {cfg.crop_size}")
    positions: dict[int, int] = {}
    if state:
        if int(state.get("num_workers", cfg.num_workers)) != cfg.num_workers or int(
            state.get("world_size", world_size)
        ) != world_size:
            raise ValueError(
                "cannot resume the data position with a different number of workers or processes "
                f"(saved: {state.get('num_workers')} workers x {state.get('world_size')} processes)"
            )
        positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be at least 1, got {cfg.batch_size}")
    dataset = ShardStream(urls, cfg, seed=seed, rank=rank, world_size=world_size, epochs=epochs,
                          start_positions=positions, shards_key=shards_key)
    dataset.next_worker = int(state.get("next_worker", 0)) if state else 0
    return Loader(dataset, cfg.num_workers)
