"""`composer-diffusion demo`: the main job on the embedded default (synthetic scenes), end to end.

1. render synthetic scenes into webdataset shards;
2. stream them back through the training loader (counting any skipped sample);
3. decompose one scene into its representations (the ones that need no downloaded weights; instances and
   depth come from the scene's ground truth) and write a labelled sheet;
4. when a trained demo pipeline is available (``--model``, default ``assets/demo-model``), compose new images
   from conditions taken from two different scenes and write them beside those conditions; with upsampling
   stages in the folder, one image of each composition also goes up the cascade to its last size (1024 px).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from composer.commands._common import add_runtime_arguments, positive_int

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "demo-model"


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the main job on the embedded default (synthetic scenes)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--num-images", "--num", dest="num", type=positive_int, default=64,
                        help="scenes to render (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a trained pipeline folder for step 4")
    parser.add_argument("--steps", type=positive_int, default=25, help="sampling steps for step 4")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="where step 4's cascade stops (default: the folder's last stage, 1024 px for the demo "
                             "model; 64 skips the upsampling)")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from composer.config import load_config
    from composer.data.loader import make_loader
    from composer.data.shards import write_scene_shards
    from composer.imageio import labelled_row
    from composer.train.samples import centre_mask
    from decomposers.set import DecomposerSet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shards = write_scene_shards(out / "scenes", args.num, 64, seed=args.seed, shard_size=max(1, args.num // 4),
                                overwrite=True)
    print(f"[1/4] rendered {args.num} scenes into {len(shards)} shards under {out / 'scenes'}")

    cfg = load_config(["data/scenes"], ["data.batch_size=16"])
    cfg.data.shards = [str(p) for p in shards]
    loader = make_loader(cfg.data, seed=args.seed, epochs=1)
    batches = list(loader)
    images = sum(len(b["key"]) for b in batches)
    print(f"[2/4] streamed {images} samples in {len(batches)} batches; skipped: {loader.skipped() or 'none'}")

    batch = batches[0]
    names = ["palette", "sketch", "instances", "depth", "intensity", "masking"]
    decomposers = DecomposerSet(names)
    extras = {k: batch[k][:1] for k in ("instances", "classes", "depth")}
    conditions = decomposers.decompose(batch["image"][:1], extras=extras, mask=centre_mask(batch["image"][:1]))
    tiles = [("scene", batch["image"][:1])] + [(n, decomposers.visualize(n, conditions[n])) for n in names]
    labelled_row(tiles, tile=128).save(out / "decomposition.png")
    print(f"[3/4] decomposed scene {batch['key'][0]!r} ({batch['caption'][0]!r}) -> {out / 'decomposition.png'}")

    model = Path(args.model)
    from composer.pipelines.layout import is_pipeline_folder

    if not is_pipeline_folder(model):
        print(f"[4/4] no trained pipeline at {model}: skipping generation (train one with `composer-diffusion train`)")
    else:
        from composer.pipelines.demo import compose_from_two_scenes

        path = compose_from_two_scenes(model, batch, out, steps=args.steps, seed=args.seed, device=args.device,
                                       precision=args.precision, size=args.size)
        print(f"[4/4] composed new images from conditions of two scenes -> {path}")
        finals = sorted(path.parent.glob("composed-*/*.png"))
        if finals:
            print(f"      and through the cascade, at {finals[0].parent.name.split('-')[-1]} px -> {finals[0].parent}/")
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {out}")
    return 0
