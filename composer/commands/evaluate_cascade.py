"""`composer-diffusion evaluate-cascade`: how well each upsampling stage restores held-out images.

Renders --num held-out scenes at the pipeline's last resolution (generate_scene(SEED, k, 1024); seed 99 is
used by no training), feeds each stage the TRUE low-resolution image (the true image at the stage's
resolution downsampled by its scale, antialiased bicubic, as the stage's training does) and scores its
output and bicubic upsampling of the same input: PSNR and SSIM vs the true image, edge sharpness (mean
Sobel gradient magnitude of the luma as a fraction of the true image's, and the same ratio of RMS
magnitudes, the one that falls with blur) and consistency (PSNR of the output downsampled back to the
input size vs the input). Mean ± 95 % CI over scenes, and the paired difference stage - bicubic. Writes
OUT/table.md, OUT/results.json and OUT/cascade.png (the base model's samples of a few scenes from their
sketch + palette, through every stage, beside bicubic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from composer.commands._common import add_runtime_arguments, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate-cascade", help="score the cascade's upsampling stages against bicubic "
                                   "on held-out scenes", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pipeline folder with upsampling stages")
    parser.add_argument("--num", type=positive_int, default=128, help="held-out scenes (default 128)")
    parser.add_argument("--seed", type=int, default=99, help="the held-out scenes' seed (default 99, used by no "
                        "training); scene k's samples start from the noise seeded by SEED + k")
    parser.add_argument("--stages", default=None, metavar="NAME,NAME",
                        help="the stages to measure, e.g. upsampler_256,upsampler_1024 (default: all)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="sampling steps of every stage (default: each stage's saved count)")
    parser.add_argument("--batch", type=positive_int, default=2, help="scenes per sampling call (default 2)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="render the scenes at this side instead of the last stage's resolution; every "
                             "stage's sizes shrink with it (for quick checks; default: e.g. 1024)")
    parser.add_argument("--no-local-maps", action="store_true",
                        help="measure stages that take local maps (e.g. a sketch) without them (default: each such "
                             "stage gets its maps decomposed from the true high-res image)")
    parser.add_argument("--picture", type=int, default=3, metavar="N",
                        help="scenes in cascade.png (default 3; 0: no picture)")
    add_runtime_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for table.md, results.json and cascade.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from composer.evaluate.cascade import (
        CascadeSettings,
        cascade_picture,
        evaluate_cascade,
        markdown,
        plan,
        select_stages,
        write_cascade_report,
    )
    from composer.pipelines.composer_pipeline import ComposerPipeline
    from composer.pipelines.layout import is_pipeline_folder
    from composer.runtime import resolve_precision
    from composer.train.threads import ThreadGovernor

    print(ThreadGovernor("auto").start(), flush=True)  # the cores other processes leave free (OMP_NUM_THREADS wins)

    started = time.perf_counter()
    if not is_pipeline_folder(args.model):
        raise ValueError(f"--model {args.model} is not a pipeline folder (no model_index.json); pass e.g. "
                         "assets/demo-model with stages attached")
    if args.picture < 0:
        raise ValueError(f"--picture must be 0 or more scenes, got {args.picture}")
    names = None if args.stages is None else args.stages.split(",")
    index = json.loads((Path(args.model) / "model_index.json").read_text())
    takes_maps = any(entry.get("local") for entry in index.get("stages", [])) and not args.no_local_maps
    pipe = ComposerPipeline.from_pretrained(args.model, load_decomposers=args.picture > 0 or takes_maps,
                                            device=args.device)
    pipe.set_progress_bar_config(disable=True)
    settings = CascadeSettings(num=args.num, seed=args.seed, stages=names, steps=args.steps, batch=args.batch,
                               size=args.size, precision=args.precision, local_maps=not args.no_local_maps)
    # every check before the long work: stage names, sizes, precision
    plan(pipe, select_stages(pipe, names), args.size)
    resolve_precision(settings.precision or pipe.sampling.precision, pipe.unet.device)
    result = evaluate_cascade(pipe, settings, log=lambda line: print(line, flush=True))
    picture = cascade_picture(pipe, seed=args.seed, count=min(args.picture, args.num) if args.picture else 0,
                              steps=args.steps, precision=args.precision, log=lambda line: print(line, flush=True))
    result["model"] = str(args.model)
    result["seconds"]["all"] = round(time.perf_counter() - started, 1)
    paths = write_cascade_report(result, picture, args.out)
    print()
    print(markdown(result), end="")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {result['seconds']['all']:.0f} s")
    return 0
