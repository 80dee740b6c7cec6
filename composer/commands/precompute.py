"""`composer-diffusion precompute`: run chosen decomposers over shards once, store their outputs as members.

Each output shard holds every original member plus ``KEY.<name>.npy`` per chosen representation (local maps
as float16 to halve the size, global vectors as float32). List the names in ``data.extras`` and the loader
reads them; the DecomposerSet then uses a precomputed tensor of the representation's own shape instead of
running the model again.

``instances`` is the exception: YOLO's id maps are written as ``KEY.instances.png`` and ``KEY.classes.png``
(16-bit, the scenes' ground-truth format, kept as is where a sample already has it); list both in
``data.extras``.

Not precomputable: ``caption`` (a dict of three tensors; it is cheap next to the image models) and
``masking`` (a new random mask every step is the point of it).

The output shards are written into a hidden folder inside --out and moved into place only when every one
is complete: a failure anywhere (an unreadable input shard, an exception in a decomposer) leaves what --out
held before untouched and no partial file behind. Shards already in --out are replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.commands._common import add_config_arguments, config_from_args

if TYPE_CHECKING:
    import numpy as np
    import torch

NOT_PRECOMPUTABLE = {"caption": "it is a dict of three tensors and cheap to run", "masking": "its mask is redrawn every step"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("precompute", help="run decomposers over shards and store their outputs as members",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, action="append", help="input shards: path, glob or brace pattern")
    parser.add_argument("--only", required=True, help="comma-separated representation names")
    parser.add_argument("--out", required=True, help="output folder (shards keep their file names)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where the decomposers run: auto (CUDA when available, else the CPU), cpu or cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of the same names already in --out")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from decomposers.set import DecomposerSet

    # 1. Check inputs: every argument is checked before anything is read or written
    cfg = config_from_args(args)
    names = _representation_names(args.only)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = _device(args.device)
    urls, out, targets = _output_plan(args.shards, args.out, args.overwrite)
    # 2. Build the chosen decomposers
    decomposers = DecomposerSet.from_config(cfg.decomposers, only=names).to(device)
    # 3. Write every shard into a staging folder inside --out; all move into place once all are complete
    written = skipped = 0
    empty: list[str] = []  # shards without one readable sample: not written (an empty tar would train on nothing)
    with _staging_folder(out, targets) as staging:
        for url, target in tqdm(list(zip(urls, targets)), unit="shard", desc="precompute"):
            counts = _precompute_shard(url, staging / target.name, decomposers, names, device, args.batch_size)
            written, skipped = written + counts[0], skipped + counts[1]
            if counts[0] == 0:
                (staging / target.name).unlink()
                empty.append(url)
        if not written:
            raise ValueError(f"no readable sample in {len(urls)} input shard(s) ({skipped} unreadable); nothing was "
                             "written: check the shards with `composer-diffusion shards` or give others")
    # 4. Report
    members = [n + ".npy" for n in names if n != "instances"] + (["instances.png", "classes.png"] if "instances" in names else [])
    print(f"wrote {written} samples with {', '.join(members)} to {out}"
          + (f"; skipped {skipped} unreadable samples" if skipped else "")
          + (f"; {len(empty)} shard(s) had no readable sample and were not written: {', '.join(empty)}" if empty else ""))
    return 0


# --- checking the arguments -----------------------------------------------------------------------------


def _representation_names(only: str) -> list[str]:
    """The names in --only, each one that can be precomputed."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    if not names:
        raise ValueError("--only names no representation; give e.g. --only palette,sketch")
    for name in names:
        if name in NOT_PRECOMPUTABLE:
            raise ValueError(f"{name} cannot be precomputed ({NOT_PRECOMPUTABLE[name]}); leave it out of --only")
    return names


def _device(name: str) -> torch.device:
    from composer.runtime import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError:  # e.g. "cuda:x"
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from None


def _output_plan(shards: list[str], out_dir: str, overwrite: bool) -> tuple[list[str], Path, list[Path]]:
    """The input shard urls, the --out folder and each shard's output path there (checked: no input is
    overwritten, no two outputs collide, existing outputs only with --overwrite)."""
    from composer.data.loader import _check_shards, expand_shards

    urls = expand_shards(shards)
    _check_shards(urls, shards, "--shards")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the output shards")
    targets = [out / Path(url).name for url in urls]
    clashes = [str(t) for t, url in zip(targets, urls) if t.resolve() == Path(url).resolve()]
    if clashes:
        raise ValueError(f"--out would overwrite the input shard {clashes[0]}; choose another --out folder")
    if len(set(targets)) < len(targets):
        raise ValueError("two input shards share a file name and would overwrite each other in --out; "
                         "precompute them into separate folders")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} of the output shards (first: {existing[0].name}); "
                              "choose another --out or pass --overwrite")
    return urls, out, targets


# --- writing the shards ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _staging_folder(out: Path, targets: list[Path]) -> Iterator[Path]:
    """A hidden folder inside ``out`` to write the shards into. When the block completes, each shard is moved
    over its target (each move atomic); on any failure the folder is removed, and ``out`` too if this created
    it and it is empty, so what ``out`` held before is untouched and no partial file is left."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".precompute-", dir=out))
    try:
        yield staging
        for target in targets:
            if (staging / target.name).exists():  # a shard with no readable sample is not written
                os.replace(staging / target.name, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _precompute_shard(url: str, path: Path, decomposers: Any, names: list[str], device: torch.device,
                      batch_size: int) -> tuple[int, int]:
    """Copy shard ``url`` to ``path`` with the representations added, in batches of one image size;
    returns (samples written, unreadable samples skipped)."""
    import webdataset as wds

    from composer.data.decode import SampleError, decode_rgb, find_image_member

    written = skipped = 0
    with wds.TarWriter(str(path)) as sink:
        pending: list[tuple[dict, torch.Tensor, dict]] = []
        for sample in _read_shard(url):
            try:
                image = decode_rgb(sample[find_image_member(sample)], 64_000_000)
                truth = _ground_truth(sample)
            except SampleError:
                skipped += 1
                continue
            if pending and pending[0][1].shape != image.shape:  # a batch needs one image size
                written += _write_batch(pending, sink, decomposers, names, device)
                pending = []
            pending.append((sample, image, truth))
            if len(pending) == batch_size:
                written += _write_batch(pending, sink, decomposers, names, device)
                pending = []
        written += _write_batch(pending, sink, decomposers, names, device)
    return written, skipped


def _read_shard(url: str) -> Iterator[dict]:
    """The samples of one input shard; a shard that is not a readable tar is one clear error."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    stream = group_by_keys(tar_file_expander(url_opener([{"url": url}])))
    while True:
        try:
            sample = next(stream)
        except StopIteration:
            return
        except Exception as error:
            first = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
            detail = " ".join(first.split())[:200]  # webdataset appends the stream and url to args
            raise ValueError(f"input shard {url} cannot be read ({type(error).__name__}: {detail}); "
                             "rewrite it or leave it out of --shards") from None
        yield sample


def _ground_truth(sample: dict) -> dict[str, torch.Tensor]:
    """The sample's ground-truth maps (instances, classes, depth) that it has, as tensors."""
    import numpy as np
    import torch

    from composer.data.decode import decode_map

    truth = {}
    for key in ("instances", "classes", "depth"):
        if f"{key}.png" in sample:
            array = decode_map(sample[f"{key}.png"], 64_000_000)
            truth[key] = torch.from_numpy(array.astype(np.float32 if key == "depth" else np.int64))
    return truth


def _write_batch(pending: list[tuple[dict, torch.Tensor, dict]], sink, decomposers: Any, names: list[str],
                 device: torch.device) -> int:
    """Decompose one batch of same-sized images and write each sample with its new members; returns the count."""
    import torch

    if not pending:
        return 0
    images = torch.stack([image for _, image, _ in pending]).to(device)
    extras = {}
    for key in ("instances", "classes", "depth"):
        if all(key in truth for _, _, truth in pending):
            tensor = torch.stack([truth[key] for _, _, truth in pending])[:, None]
            extras[key] = tensor / 65535.0 if key == "depth" else tensor
    # instances are stored as what the loader calls "instances"/"classes": id maps (16-bit PNG, nearest
    # resizing), never the 5-channel encoding, which would shadow the ids that masking's object masks read
    maps = None
    if "instances" in names and "instances" not in extras:
        maps = decomposers.decomposers["instances"].predict_maps(images)
    others = [n for n in names if n != "instances"]
    conditions = decomposers.decompose(images, extras=extras, names=others) if others else {}
    for i, (sample, _, _) in enumerate(pending):
        sink.write(_output_record(sample, i, conditions, others, maps))
    return len(pending)


def _output_record(sample: dict, i: int, conditions: dict[str, torch.Tensor], others: list[str],
                   maps: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Sample ``i`` of the batch: its original members plus ``NAME.npy`` per representation (local maps as
    float16) and, when YOLO ran and the sample has no ground truth, its instance and class id maps."""
    import numpy as np

    from composer.data.shards import encode_png

    record = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
    for name in others:
        rep = conditions[name][i].detach().float().cpu().numpy()
        record[f"{name}.npy"] = _npy_bytes(rep.astype(np.float16) if rep.ndim == 3 else rep)
    if maps is not None and "instances.png" not in sample:  # ground truth, when present, is kept
        record["instances.png"] = encode_png(maps[0][i, 0].cpu().numpy().astype(np.uint16))
        record["classes.png"] = encode_png(maps[1][i, 0].cpu().numpy().astype(np.uint16))
    return record


def _npy_bytes(array: np.ndarray) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
