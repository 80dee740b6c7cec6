"""`composer-diffusion precompute`: run chosen decomposers over shards once, store their outputs as members.

Each output shard holds every original member plus ``KEY.<name>.npy`` per chosen representation (local maps
as float16 to halve the size, global vectors as float32). List the names in ``data.extras`` and the loader
reads them; the DecomposerSet then uses a precomputed tensor of the representation's own shape instead of
running the model again.

Not precomputable: ``caption`` (a dict of three tensors; it is cheap next to the image models) and
``masking`` (a new random mask every step is the point of it).
"""

from __future__ import annotations

import argparse
import io
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
    parser.add_argument("--device", default="cpu")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import webdataset as wds
    from tqdm.auto import tqdm

    from composer.data.decode import SampleError, decode_map, decode_rgb, find_image_member
    from composer.data.loader import _check_shards, expand_shards
    from decomposers.set import DecomposerSet

    cfg = config_from_args(args)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for name in names:
        if name in NOT_PRECOMPUTABLE:
            raise ValueError(f"{name} cannot be precomputed ({NOT_PRECOMPUTABLE[name]}); leave it out of --only")
    decomposers = DecomposerSet.from_config(cfg.decomposers, only=names).to(args.device)
    urls = expand_shards(args.shards)
    _check_shards(urls, args.shards)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = written = 0

    def encode(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    def flush(pending: list[tuple[dict, torch.Tensor]], sink) -> None:
        nonlocal written
        if not pending:
            return
        images = torch.stack([image for _, image in pending]).to(args.device)
        extras = {}
        for key in ("instances", "classes", "depth"):
            if all(f"{key}.png" in sample for sample, _ in pending):
                maps = [torch.from_numpy(decode_map(s[f"{key}.png"], 1 << 30).astype(np.int64 if key != "depth" else np.float32))
                        for s, _ in pending]
                tensor = torch.stack(maps)[:, None]
                extras[key] = tensor / 65535.0 if key == "depth" else tensor
        conditions = decomposers.decompose(images, extras=extras)
        for i, (sample, _) in enumerate(pending):
            record = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            for name in names:
                rep = conditions[name][i].detach().float().cpu().numpy()
                record[f"{name}.npy"] = encode(rep.astype(np.float16) if rep.ndim == 3 else rep)
            sink.write(record)
            written += 1
        pending.clear()

    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    for url in tqdm(urls, unit="shard", desc="precompute"):
        target = out / Path(url).name
        with wds.TarWriter(str(target)) as sink:
            pending: list[tuple[dict, torch.Tensor]] = []
            for sample in group_by_keys(tar_file_expander(url_opener([{"url": url}]))):
                try:
                    image = decode_rgb(sample[find_image_member(sample)], 64_000_000)
                except SampleError:
                    skipped += 1
                    continue
                if pending and pending[0][1].shape != image.shape:
                    flush(pending, sink)  # a batch needs one image size
                pending.append((sample, image))
                if len(pending) == args.batch_size:
                    flush(pending, sink)
            flush(pending, sink)
    print(f"wrote {written} samples with {', '.join(n + '.npy' for n in names)} to {out}"
          + (f"; skipped {skipped} unreadable samples" if skipped else ""))
    return 0
