"""`composer-diffusion evaluate`: how faithfully a pipeline's samples follow each condition.

For every single condition the model accepts, for all of them, for none, and for pairs of conditions taken
from two different held-out scenes, generate from the first --num held-out scenes (sample k from the noise
seeded by --seed + k) and score each condition with a measure independent of the model under test:
palette (CIELab histogram intersection), sketch (edge F1, 2 px tolerance), intensity (grayscale PSNR),
masking (PSNR of the kept region and of the filled hole; pixels changed outside the mask), depth (Spearman
of a depth model's estimate), instances (Hungarian-matched mask IoU of an instance model's masks), caption
and image embedding (scene-CLIP retrieval top-1 among the held-out set, share of the named colours and
shapes found), and scene-CLIP FID/KID of every run. Each score stands beside its floor (none) and ceiling
(the source image). Writes OUT/results.json, OUT/results.md and OUT/contact.png.

Depth and instances are scored only with an estimator: --depth-model / --instances-model, or the
pipeline's own depth / instances decomposer when its folder names weights for it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from composer.commands._common import add_runtime_arguments, finite_float, positive_int

DEFAULT_CLIP = Path(__file__).resolve().parents[2] / "assets" / "scene-clip" / "scene-clip-tiny.safetensors"


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score how faithfully a pipeline follows each condition",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pipeline folder (e.g. assets/demo-model)")
    parser.add_argument("--shards", required=True, action="append", metavar="HELDOUT",
                        help="held-out shards: paths, globs or brace patterns (repeatable), e.g. "
                             "'data/scenes-heldout/scenes-*.tar'")
    parser.add_argument("--num", type=positive_int, default=64, help="held-out scenes to generate from (default 64)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=finite_float, default=None, help="guidance weight (default: the model's)")
    parser.add_argument("--guidance-rescale", type=finite_float, default=None, metavar="PHI",
                        help="guidance rescale, 0 to 1 (default: the model's, 0)")
    parser.add_argument("--guide-masking", action="store_true",
                        help="guide masking like any condition in the region-edit run (default: held in guidance's "
                             "c1, keeping the known pixels in both branches)")
    parser.add_argument("--seed", type=int, default=0, help="sample k starts from the noise seeded by SEED + k")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per sampling call (default 16)")
    parser.add_argument("--pairs", default=None, metavar="A+B,C+D",
                        help="condition pairs (A from scene k, B from scene k + 1), or 'none' (default: "
                             "sketch+palette, depth+caption, instances+image_embedding, intensity+palette, "
                             "those the model accepts)")
    parser.add_argument("--runs", default=None, metavar="A,B,all",
                        help="make only these runs: conditions and/or 'all' (the floor 'none' always runs; pairs as "
                             "--pairs says); default: every run")
    parser.add_argument("--clip", default=str(DEFAULT_CLIP), metavar="FILE.safetensors",
                        help="scene-CLIP weights for retrieval and FID/KID, with FILE.json beside them "
                             "(default assets/scene-clip/scene-clip-tiny.safetensors)")
    parser.add_argument("--depth-model", default=None, metavar="DIR",
                        help="a transformers depth model folder to score depth with (default: the pipeline's "
                             "depth decomposer's weights, if any)")
    parser.add_argument("--instances-model", default=None, metavar="FILE",
                        help="YOLO segmentation weights (.safetensors) to score instances and shapes with "
                             "(default: the pipeline's instances decomposer's weights, if any)")
    parser.add_argument("--columns", type=positive_int, default=8, help="scenes on the contact sheet (default 8)")
    add_runtime_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for results.json, results.md and contact.png")
    parser.set_defaults(func=run)


def estimators(pipe, depth_model: str | None, instances_model: str | None):
    """(depth callable or None, instances callable or None, the instance model's class names or None, notes):
    the models given on the command line,
    else the pipeline's own depth / instances decomposers when their folder names weights that load (their
    predict methods always run the model, never ground truth). A given model that fails to load is an
    error; the pipeline's own is skipped with a note."""
    own = dict(pipe.decomposers.decomposers.items()) if pipe.decomposers is not None else {}
    device = pipe.unet.device
    notes: list[str] = []
    if depth_model is not None:
        from decomposers.depth import DepthDecomposer

        if not Path(depth_model).is_dir():
            raise FileNotFoundError(f"--depth-model {depth_model}: no such folder (a transformers depth model saved "
                                    "with save_pretrained)")
        decomposer = DepthDecomposer(weights=depth_model).to(device)
        decomposer.model()
        depth = decomposer.predict
    else:
        depth = _own(own.get("depth"), "model", "depth", notes)
    if instances_model is not None:
        from decomposers.instances import InstancesDecomposer

        if not Path(instances_model).is_file():
            raise FileNotFoundError(f"--instances-model {instances_model}: no such file (YOLO segmentation weights, "
                                    ".safetensors)")
        decomposer = InstancesDecomposer(weights=instances_model).to(device)
        decomposer.yolo()
        instances = decomposer.predict_maps
    else:
        instances = _own(own.get("instances"), "yolo", "instances", notes)
    names = None
    if instances is not None:
        table = dict(getattr(instances.__self__.yolo().model, "names", {}) or {})
        names = [str(table[i]) for i in sorted(table)] if table else None
    return depth, instances, names, notes


def _own(decomposer, loader: str, name: str, notes: list[str]):
    """The pipeline's decomposer's predict method when its weights load, else None (with a note why)."""
    if decomposer is None or not getattr(decomposer, "weights", None):
        return None
    try:
        getattr(decomposer, loader)()
    except (ValueError, FileNotFoundError, OSError) as error:
        notes.append(f"the pipeline's {name} model does not load ({' '.join(str(error).split())[:200]}); "
                     f"{name} is not scored with it")
        return None
    return decomposer.predict if name == "depth" else decomposer.predict_maps


def run(args: argparse.Namespace) -> int:
    from composer.evaluate.report import write_report
    from composer.evaluate.run import EvalSettings, evaluate, parse_pairs
    from composer.evaluate.scoring import MEASURES, Scorer
    from composer.pipelines.composer_pipeline import ComposerPipeline
    from composer.pipelines.layout import is_pipeline_folder
    from composer.train.threads import ThreadGovernor

    print(ThreadGovernor("auto").start(), flush=True)  # the cores other processes leave free (OMP_NUM_THREADS wins)
    started = time.perf_counter()
    if not is_pipeline_folder(args.model):
        raise ValueError(f"--model {args.model} is not a pipeline folder (no model_index.json); pass e.g. "
                         "assets/demo-model or runs/tiny/pipeline")
    if args.num < 2:
        raise ValueError(f"--num must be at least 2 (retrieval and pairs compare scenes), got {args.num}")
    pairs = parse_pairs(args.pairs, [n for n in MEASURES if n != "slots"])
    pipe = ComposerPipeline.from_pretrained(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    depth, instances, instance_names, estimator_notes = estimators(pipe, args.depth_model, args.instances_model)
    sketch = pipe.decomposers.decomposers["sketch"] if pipe.decomposers is not None and "sketch" in pipe.decomposers.names else None
    scorer = Scorer(args.clip, sketch=sketch, depth_model=depth, instance_model=instances,
                    instance_names=instance_names, device=pipe.unet.device)
    settings = EvalSettings(num=args.num, steps=args.steps, guidance_scale=args.guidance,
                            guidance_rescale=args.guidance_rescale, seed=args.seed,
                            batch_size=args.batch_size, precision=args.precision, pairs=pairs,
                            runs=None if args.runs is None else args.runs.split(","), sheet_columns=args.columns,
                            guide_masking=args.guide_masking)
    result, samples = evaluate(pipe, args.shards, settings, scorer)
    result["model"] = str(args.model)
    result["notes"] = estimator_notes + result["notes"]
    result["estimators"] = {"depth": args.depth_model or ("pipeline's depth decomposer" if depth else None),
                            "instances": args.instances_model or ("pipeline's instances decomposer" if instances else None)}
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    paths = write_report(result, samples, args.out, columns=args.columns)
    print(f"evaluated {len(result['runs'])} runs of {result['num']} images in {result['seconds']['total']:.0f} s; "
          f"wrote {paths['json']}, {paths['markdown']}, {paths['sheet']}")
    for note in result["notes"]:
        print(f"note: {note}")
    return 0
