"""Seconds per stage and peak memory (RSS) of one `generate --size 1024` (sketch A + palette B) on this CPU.

    python bench/cascade.py [--model assets/demo-model] [--size 1024] [--precision auto] [--random-stages]

A pipeline folder without upsamplers (or with --random-stages) is copied to a temporary folder and given
UNTRAINED random sr256-tiny and sr1024-tiny stages: the timings and memory are then those of the stages'
architecture, not of trained weights (the images are noise). The run happens in a child process, so its
peak RSS is the generate's alone (ru_maxrss of the child, model loading included).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def with_random_stages(model: Path, work: Path) -> Path:
    """A copy of ``model`` with untrained sr256-tiny and sr1024-tiny stages attached."""
    from composer.diffusion.schedulers import make_scheduler
    from composer.pipelines import ComposerPipeline, layout
    from upsamplers.presets import build_upsampler
    from upsamplers.stage import StageSettings

    folder = work / "pipeline"
    shutil.copytree(model, folder)
    pipe = ComposerPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    for name, preset, crop, resolution, steps in (("upsampler_256", "sr256-tiny", 64, 256, 10),
                                                  ("upsampler_1024", "sr1024-tiny", 128, 1024, 5)):
        scheduler = make_scheduler("ddpm", pipe.scheduler.config)
        settings = StageSettings(name, resolution, steps=steps, prediction_type=pipe.config.prediction_type)
        pipe.add_stage(build_upsampler(preset, crop).eval(), scheduler, settings)
    return layout.publish(pipe, folder)


def child(model: str, size: int, precision: str, steps: int | None) -> None:
    """The measured run: load, decompose two scenes, sample through the cascade; print JSON timings (the
    base's seconds include decomposing the two scenes)."""
    from composer.data.scenes import generate_scene
    from composer.pipelines import ComposerPipeline

    torch.set_num_threads(2)
    start = time.perf_counter()
    pipe = ComposerPipeline.from_pretrained(model)
    load = time.perf_counter() - start
    scenes = [torch.from_numpy(generate_scene(7, i, 64).image).permute(2, 0, 1)[None] for i in range(2)]
    marks: list[tuple[str, float]] = []
    record = lambda p, i, t, k: marks.append((p.current_stage, time.perf_counter()))  # noqa: E731
    begin = time.perf_counter()
    out = pipe(images={"sketch": scenes[0], "palette": scenes[1]}, size=size, generator=torch.Generator().manual_seed(0),
               precision=precision, upsampler_steps=steps, callback_on_step_end=record, output_type="pt",
               progress=False).images
    total = time.perf_counter() - begin
    seconds: dict[str, float] = {}
    previous = begin
    for stage, moment in marks:
        seconds[stage] = seconds.get(stage, 0.0) + moment - previous
        previous = moment
    print(json.dumps({"load": load, "stages": seconds, "total": total, "shape": list(out.shape),
                      "steps": {s.settings.name: steps or s.settings.steps for s in pipe.upsamplers},
                      "base_steps": pipe.sampling.steps}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "demo-model"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--upsampler-steps", type=int, default=None)
    parser.add_argument("--random-stages", action="store_true", help="attach untrained stages even if it has some")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.size, args.precision, args.upsampler_steps)
        return 0
    from composer.pipelines import ComposerPipeline

    with tempfile.TemporaryDirectory() as work:
        model, untrained = Path(args.model), False
        if args.random_stages or not ComposerPipeline.from_pretrained(model, load_decomposers=False).upsamplers:
            model, untrained = with_random_stages(model, Path(work)), True
        command = [sys.executable, __file__, "--child", "--model", str(model), "--size", str(args.size),
                   "--precision", args.precision]
        if args.upsampler_steps:
            command += ["--upsampler-steps", str(args.upsampler_steps)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"the measured run failed: {result.stderr.strip().splitlines()[-1:]}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2  # KiB -> GiB (Linux)
    print(f"generate --size {args.size} ({'UNTRAINED random stages' if untrained else 'the folder stages'}, "
          f"precision {args.precision}, 2 threads): output {report['shape']}")
    print(f"{'stage':<16}{'steps':>6}{'seconds':>10}")
    steps = {"base": report["base_steps"], **report["steps"]}
    for stage, seconds in report["stages"].items():
        print(f"{stage:<16}{steps.get(stage, ''):>6}{seconds:>10.1f}")
    print(f"{'sampling total':<22}{report['total']:>10.1f}")
    print(f"{'model loading':<22}{report['load']:>10.1f}")
    print(f"peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
