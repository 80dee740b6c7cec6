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
import io
import os
import shutil
import tempfile
from pathlib import Path

from composer.commands._common import add_config_arguments, config_from_args

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
    import numpy as np
    import torch
    import webdataset as wds
    from tqdm.auto import tqdm

    from composer.data.decode import SampleError, decode_map, decode_rgb, find_image_member
    from composer.data.loader import _check_shards, expand_shards
    from composer.data.shards import encode_png
    from composer.runtime import resolve_device
    from decomposers.set import DecomposerSet

    # every argument is checked before anything is read or written
    cfg = config_from_args(args)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names:
        raise ValueError("--only names no representation; give e.g. --only palette,sketch")
    for name in names:
        if name in NOT_PRECOMPUTABLE:
            raise ValueError(f"{name} cannot be precomputed ({NOT_PRECOMPUTABLE[name]}); leave it out of --only")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        device = resolve_device(args.device)
    except RuntimeError:  # e.g. "cuda:x"
        raise ValueError(f"unknown device {args.device!r}; choose auto, cpu, cuda or cuda:N") from None
    urls = expand_shards(args.shards)
    _check_shards(urls, args.shards, "--shards")
    out = Path(args.out)
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
    if existing and not args.overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} of the output shards (first: {existing[0].name}); "
                              "choose another --out or pass --overwrite")
    decomposers = DecomposerSet.from_config(cfg.decomposers, only=names).to(device)
    skipped = written = 0

    def encode(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    def flush(pending: list[tuple[dict, torch.Tensor, dict]], sink) -> None:
        nonlocal written
        if not pending:
            return
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
            record = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            for name in others:
                rep = conditions[name][i].detach().float().cpu().numpy()
                record[f"{name}.npy"] = encode(rep.astype(np.float16) if rep.ndim == 3 else rep)
            if maps is not None and "instances.png" not in sample:  # ground truth, when present, is kept
                record["instances.png"] = encode_png(maps[0][i, 0].cpu().numpy().astype(np.uint16))
                record["classes.png"] = encode_png(maps[1][i, 0].cpu().numpy().astype(np.uint16))
            sink.write(record)
            written += 1
        pending.clear()

    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    def read(url: str):
        """The samples of one input shard; a shard that is not a readable tar is one clear error."""
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

    def ground_truth(sample: dict) -> dict[str, torch.Tensor]:
        truth = {}
        for key in ("instances", "classes", "depth"):
            if f"{key}.png" in sample:
                array = decode_map(sample[f"{key}.png"], 64_000_000)
                truth[key] = torch.from_numpy(array.astype(np.float32 if key == "depth" else np.int64))
        return truth

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".precompute-", dir=out))
    try:
        for url, target in tqdm(list(zip(urls, targets)), unit="shard", desc="precompute"):
            with wds.TarWriter(str(staging / target.name)) as sink:
                pending: list[tuple[dict, torch.Tensor, dict]] = []
                for sample in read(url):
                    try:
                        image = decode_rgb(sample[find_image_member(sample)], 64_000_000)
                        truth = ground_truth(sample)
                    except SampleError:
                        skipped += 1
                        continue
                    if pending and pending[0][1].shape != image.shape:
                        flush(pending, sink)  # a batch needs one image size
                    pending.append((sample, image, truth))
                    if len(pending) == args.batch_size:
                        flush(pending, sink)
                flush(pending, sink)
        for target in targets:  # every shard is complete: move them into place (each move is atomic)
            os.replace(staging / target.name, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    members = [n + ".npy" for n in names if n != "instances"] + (["instances.png", "classes.png"] if "instances" in names else [])
    print(f"wrote {written} samples with {', '.join(members)} to {out}"
          + (f"; skipped {skipped} unreadable samples" if skipped else ""))
    return 0
