"""The evaluation run: generate from held-out scenes under condition subsets and score each condition.

    result = evaluate(pipe, shards, EvalSettings(num=64, steps=25), scorer)   # a JSON-ready dict

Runs: ``none`` (the floor: nothing given), each single condition the model accepts (``masking`` as a
region edit: the centre half of each side regenerated, the rest pasted back), ``all`` (every condition,
masking as a plain condition), and pairs whose first condition comes from scene i and second from scene
i + 1 (mod N). The held-out sources scored the same way are the ceiling. Sample k of every run starts from
the noise seeded by ``seed + k``, so runs differ only in what they are given.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from composer.conditions import Conditions
from composer.evaluate import metrics
from composer.evaluate.scoring import DESCRIPTIONS, MEASURES, Scorer, Targets, mean

EXTRA_MEMBERS = ("instances", "classes", "depth")  # ground-truth members the loader reads when the shards have them
DEFAULT_PAIRS = (("sketch", "palette"), ("depth", "caption"), ("instances", "image_embedding"), ("intensity", "palette"))
KEEP_THRESHOLD = 0.9  # a pair "keeps" a condition when it closes >= 90 % of that condition's single gain over none
GAP_EPSILON = 1e-6


@dataclass
class EvalSettings:
    """What to run. steps / guidance_scale None: the pipeline's saved defaults; pairs None: DEFAULT_PAIRS
    (those whose both conditions the model accepts)."""

    num: int = 64  # held-out scenes (the first ones of the shards, in order)
    steps: int | None = None  # sampling steps
    guidance_scale: float | None = None
    guidance_rescale: float | None = None  # None: the pipeline's saved default
    seed: int = 0  # sample k starts from the noise seeded by seed + k
    batch_size: int = 16  # images per pipeline call
    precision: str | None = None
    pairs: Sequence[tuple[str, str]] | None = None
    runs: Sequence[str] | None = None  # None: every run; else these labels (conditions, 'all'), with 'none' always
    sheet_columns: int = 8  # scenes shown on the contact sheet
    guide_masking: bool = False  # True: guide masking in the edit run too (the pipeline holds it in c1 in edits)


@dataclass
class Run:
    """One generation: ``sources`` maps each condition to the scene offset it comes from (0: scene k, 1: k + 1)."""

    label: str
    kind: str  # none | single | edit | all | pair
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def edit(self) -> bool:
        return self.kind == "edit"


def plan_runs(names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Run]:
    """none, each single condition (masking as an edit), all, then the pairs, for conditions ``names``."""
    runs = [Run("none", "none")]
    for name in names:
        runs.append(Run(name, "edit") if name == "masking" else Run(name, "single", {name: 0}))
    runs.append(Run("all", "all", {name: 0 for name in names}))
    for a, b in pairs:
        runs.append(Run(f"{a} + {b}", "pair", {a: 0, b: 1}))
    return runs


def parse_pairs(text: str | None, names: Sequence[str]) -> list[tuple[str, str]] | None:
    """'sketch+palette,depth+caption' -> [("sketch", "palette"), ...]; 'none' -> []; None -> None (defaults)."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    pairs = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split("+")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ValueError(f"--pairs item {item!r} is not two different conditions joined by '+', e.g. sketch+palette")
        unknown = [p for p in parts if p not in names]
        if unknown:
            raise ValueError(f"--pairs names {', '.join(unknown)}, which this evaluation cannot give; "
                             f"choose from {', '.join(names)}")
        if "masking" in parts:
            raise ValueError("--pairs cannot hold masking (it is evaluated as a region edit); pair other conditions")
        pairs.append((parts[0], parts[1]))
    return pairs


def select_runs(labels: Sequence[str], names: Sequence[str]) -> set[str]:
    """The run labels asked for (conditions and 'all'; 'none', the floor, always runs), checked against ``names``."""
    wanted = {label.strip() for label in labels if label.strip()}
    unknown = sorted(wanted - set(names) - {"all", "none"})
    if unknown:
        raise ValueError(f"--runs names {', '.join(unknown)}, which this evaluation cannot give; "
                         f"choose from {', '.join([*names, 'all'])}")
    if not wanted - {"none"}:
        raise ValueError("--runs selects nothing beyond 'none'; name at least one condition or 'all'")
    return wanted


# --- held-out data ---------------------------------------------------------------------------------------------


def shard_extras(urls: Sequence[str]) -> list[str]:
    """The ground-truth members (instances, classes, depth) the first shard's first sample carries."""
    try:
        with tarfile.open(urls[0]) as tar:
            names = []
            for member in tar:
                names.append(member.name)
                if len(names) > 64:
                    break
    except (OSError, tarfile.TarError):
        return []  # the loader reports unreadable shards itself
    if not names:
        return []
    key = names[0].split(".", 1)[0]
    members = {n.split(".", 1)[1] for n in names if n.split(".", 1)[0] == key and "." in n}
    return [e for e in EXTRA_MEMBERS if f"{e}.png" in members or f"{e}.npy" in members]


def load_held_out(shards: Sequence[str] | str, num: int, resolution: int) -> dict[str, Any]:
    """The first ``num`` samples of ``shards`` in order, at ``resolution`` (centre crop), with their
    ground-truth members when every shard has them."""
    from composer.data.config import DataConfig
    from composer.data.loader import expand_shards, make_loader

    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls = expand_shards(patterns)
    extras = shard_extras(urls) if urls else []
    if "instances" in extras and "classes" not in extras:
        extras.remove("instances")  # the instances condition needs both maps
    cfg = DataConfig(shards=patterns, resolution=resolution, crop="center", batch_size=num, num_workers=0,
                     shuffle_shards=False, shuffle_buffer=0, extras=extras)
    batch = next(iter(make_loader(cfg, seed=0, rank=0, world_size=1, epochs=1, shards_key="--shards")))
    count = len(batch["key"])
    if count < 2:
        raise ValueError(f"--shards hold {count} usable sample(s); the evaluation needs at least 2 (retrieval and "
                         "pairs compare scenes): write more with `composer-diffusion scenes`")
    return batch


# --- generation ------------------------------------------------------------------------------------------------


def _take(value, index: torch.Tensor):
    return {k: v[index] for k, v in value.items()} if isinstance(value, dict) else value[index]


def run_conditions(run: Run, conditions: Conditions, index: torch.Tensor, count: int) -> Conditions:
    """The conditions of ``run`` for the samples ``index``: each taken from scene (k + offset) mod count."""
    values, keep = {}, {}
    for name, offset in run.sources.items():
        rows = (index + offset) % count
        values[name] = _take(conditions.values[name], rows)
        if name in conditions.keep_masks:
            keep[name] = conditions.keep_masks[name][rows]
    return Conditions(values, keep, len(index))


@torch.no_grad()
def generate(pipe, run: Run, conditions: Conditions, targets: Targets, settings: EvalSettings, progress) -> torch.Tensor:
    """The run's samples (N, 3, H, W) in [0, 1] on the CPU, ``settings.batch_size`` at a time."""
    count = targets.count
    parts = []
    for start in range(0, count, settings.batch_size):
        index = torch.arange(start, min(start + settings.batch_size, count))
        generators = [torch.Generator().manual_seed(settings.seed + int(k)) for k in index]
        edit = {"image": targets.sources[index], "mask": targets.mask[index]} if run.edit else {}
        out = pipe(run_conditions(run, conditions, index, count), num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, guidance_rescale=settings.guidance_rescale,
                   guide_masking=settings.guide_masking,
                   generator=generators, output_type="pt",
                   precision=settings.precision, progress=False, size=pipe.sizes()[0], **edit).images
        parts.append(out.float().cpu())
        progress.update(len(index))
    return torch.cat(parts)


# --- the evaluation ------------------------------------------------------------------------------------------


def _means(scores: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, float | None]]:
    return {c: {m: mean(v) for m, v in measures.items()} for c, measures in scores.items()}


def _gap(value: float | None, floor: float | None, ceiling: float | None) -> float | None:
    if value is None or floor is None or ceiling is None or abs(ceiling - floor) < GAP_EPSILON:
        return None
    return (value - floor) / (ceiling - floor)


def _score_all(scorer: Scorer, names: Sequence[str], samples: torch.Tensor, targets: Targets,
               order: torch.Tensor, cache: dict) -> dict[str, dict[str, torch.Tensor]]:
    return {name: scorer.score(name, samples, targets, order, cache) for name in names}


def available_conditions(pipe, batch: dict[str, Any], mask: torch.Tensor) -> tuple[Conditions, dict[str, str]]:
    """Every condition the model accepts, taken from the held-out scenes by the pipeline's decomposers
    (ground-truth maps where the shards carry them), and {condition: why it was skipped}."""
    from composer.train.step import batch_extras

    if pipe.decomposers is None:
        raise ValueError("the pipeline was loaded without decomposers; evaluate takes every condition from the "
                         "held-out images with them (save the pipeline with its decomposers)")
    device = pipe.unet.device
    images, extras = batch["image"].to(device), batch_extras(batch, device)
    accepted = list(pipe.unet.accepted_conditions)
    values, keep, skipped = {}, {}, {}
    for name in pipe.decomposers.names:
        if name not in accepted:
            continue
        if name == "slots":
            skipped[name] = "slots have no model-independent measure here (see `composer-diffusion evaluate-slots`)"
            continue
        try:
            part = pipe.decomposers.decompose(images, captions=batch["caption"], extras=extras, names=[name],
                                              mask=mask.to(device))
        except (ValueError, FileNotFoundError) as error:  # e.g. depth without a model or ground truth
            skipped[name] = " ".join(str(error).split())
            continue
        if name not in part.values:
            skipped[name] = "the held-out samples have no captions (KEY.txt)"
            continue
        values[name] = part.values[name]
        if name in part.keep_masks:
            keep[name] = part.keep_masks[name]
    for name in accepted:
        if name not in pipe.decomposers.names:
            skipped[name] = "the pipeline has no decomposer for it"
    return Conditions(values, keep, images.shape[0]).to("cpu"), skipped


@dataclass
class _Plan:
    """What one evaluation works on: the held-out scenes, their conditions and targets, the runs to make."""

    size: int
    sources: torch.Tensor
    conditions: Conditions
    skipped: dict[str, str]
    names: list[str]
    targets: Any
    pairs: list[tuple[str, str]]
    runs: list[Any]
    notes: list[str]


def _plan(pipe, shards, settings: EvalSettings, scorer: Scorer) -> _Plan:
    """The held-out scenes, every condition taken from them, their targets, and the runs worth making."""
    from composer.train.samples import centre_mask

    size = int(pipe.unet.config.sample_size)
    batch = load_held_out(shards, settings.num, size)
    sources = batch["image"].float()
    mask = centre_mask(sources)
    conditions, skipped = available_conditions(pipe, batch, mask)
    names = list(conditions.values)
    metas = [m if isinstance(m, dict) else {} for m in batch.get("meta", [{}] * len(sources))]
    targets = scorer.targets(sources, batch["caption"], metas, conditions,
                             {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "image"}, mask)
    pairs = settings.pairs if settings.pairs is not None else [p for p in DEFAULT_PAIRS if p[0] in names and p[1] in names]
    for a, b in pairs:
        if a not in names or b not in names:
            missing = [n for n in (a, b) if n not in names]
            raise ValueError(f"pair {a}+{b}: {', '.join(missing)} cannot be given here "
                             f"({'; '.join(skipped.get(n, 'not accepted by the model') for n in missing)})")
    notes = [f"{name} not evaluated: {why}" for name, why in skipped.items()]
    for name in names:
        for measure in MEASURES[name]:
            why = scorer.unavailable(measure, targets)
            note = f"{name} / {measure} not scored: {why}"
            if why and note not in notes:
                notes.append(note)
    unscored = [n for n in names if all(scorer.unavailable(m, targets) for m in MEASURES[n])]
    runs = [r for r in plan_runs(names, pairs) if not (r.kind == "single" and r.label in unscored)]
    if settings.runs is not None:
        wanted = select_runs(settings.runs, names)
        runs = [r for r in runs if r.kind in ("none", "pair") or r.label in wanted]
    notes += [f"{name} alone not generated: none of its measures can be computed (it is still given in `all` "
              "and in pairs)" for name in unscored]
    return _Plan(size, sources, conditions, skipped, names, targets, pairs, runs, notes)


def _score_run(run, samples: torch.Tensor, plan: _Plan, scorer: Scorer, cache: dict) -> dict:
    """The scores of one run's samples: every measure for none/all, the edit's for masking, else each
    condition against the scene it came from."""
    count = plan.targets.count
    identity, shifted = torch.arange(count), (torch.arange(count) + 1) % count
    if run.kind in ("none", "all"):
        return _score_all(scorer, plan.names, samples, plan.targets, identity, cache)
    if run.edit:
        return {"masking": scorer.score("masking", samples, plan.targets, identity, cache)}
    return {n: scorer.score(n, samples, plan.targets, identity if off == 0 else shifted, cache)
            for n, off in run.sources.items()}


def _run_entry(run, samples: torch.Tensor, scores: dict, plan: _Plan, scorer: Scorer, cache: dict,
               seconds: float) -> dict[str, Any]:
    if "features" not in cache:
        cache["features"] = scorer.image_features(samples)
    entry: dict[str, Any] = {"kind": run.kind, "conditions": dict(run.sources), "scores": _means(scores),
                             "seconds": seconds, **scorer.distances(cache["features"], plan.targets)}
    if run.edit:
        changed = metrics.changed_outside(samples, plan.targets.sources, plan.targets.mask)
        entry["changed_outside"] = {"total": int(changed.sum()), "max_per_image": int(changed.max()),
                                    "pixels_outside_per_image": int((plan.targets.mask[0] < 0.5).sum())}
    return entry


def _reference(plan: _Plan, scorer: Scorer) -> dict[str, float] | None:
    """scene-CLIP FID/KID between the two halves of the held-out set (real vs real)."""
    count, half = plan.targets.count, plan.targets.count // 2
    if half < 2 or count - half < 2:
        return None
    features = scorer.image_features(plan.sources)
    return {"fid": metrics.fid(features[:half], features[half:]), "kid": metrics.kid(features[:half], features[half:])}


def evaluate(pipe, shards: Sequence[str] | str, settings: EvalSettings, scorer: Scorer) -> tuple[dict[str, Any], dict]:
    """Generate and score; returns (results as a JSON-ready dict, {run label: samples (N, 3, H, W)})."""
    from tqdm.auto import tqdm

    # 1. The held-out scenes, every condition taken from them, and the runs to make
    started = time.perf_counter()
    plan = _plan(pipe, shards, settings, scorer)
    count, shifted = plan.targets.count, (torch.arange(plan.targets.count) + 1) % plan.targets.count
    # 2. The ceiling: the sources themselves, scored the same way
    ceiling = _score_all(scorer, plan.names, plan.sources, plan.targets, torch.arange(count), {})
    reference = _reference(plan, scorer)
    # 3. Generate and score every run
    runs, per_image, samples_of, seconds = {}, {"source": _lists(ceiling)}, {}, {}
    floor, floor_shifted = {}, {}
    with tqdm(total=count * len(plan.runs), desc="evaluate", unit="img", dynamic_ncols=True) as progress:
        for run in plan.runs:
            progress.set_postfix_str(run.label)
            tick = time.perf_counter()
            samples_of[run.label] = samples = generate(pipe, run, plan.conditions, plan.targets, settings, progress)
            seconds[run.label] = round(time.perf_counter() - tick, 2)
            cache: dict = {}
            scores = _score_run(run, samples, plan, scorer, cache)
            if run.kind == "none":
                floor = scores
                floor_shifted = _score_all(scorer, plan.names, samples, plan.targets, shifted, cache)
            runs[run.label] = _run_entry(run, samples, scores, plan, scorer, cache, seconds[run.label])
            per_image[run.label] = _lists(scores)
    # 4. Summaries: each condition beside its floor and ceiling; pairs against their singles
    floor_means, shifted_means, ceiling_means = _means(floor), _means(floor_shifted), _means(ceiling)
    summary, pair_rows = summarise(plan.names, plan.pairs, runs, floor_means, shifted_means, ceiling_means)
    half = count // 2
    result = {
        "model": None, "shards": list(shards) if not isinstance(shards, str) else [shards],
        "num": count, "steps": settings.steps if settings.steps is not None else pipe.sampling.steps,
        "guidance_scale": settings.guidance_scale if settings.guidance_scale is not None else pipe.sampling.guidance_scale,
        "guidance_rescale": (settings.guidance_rescale if settings.guidance_rescale is not None
                             else pipe.sampling.guidance_rescale),
        "masking_guided": settings.guide_masking,
        "sampler": type(pipe.scheduler).__name__, "seed": settings.seed, "resolution": plan.size,
        "conditions": plan.names, "skipped": plan.skipped,
        "measures": {m: DESCRIPTIONS[m] for n in plan.names for m in MEASURES[n]},
        "psnr_cap_db": metrics.PSNR_CAP, "keep_threshold": KEEP_THRESHOLD,
        "floor": floor_means, "floor_second_of_pair": shifted_means, "ceiling": ceiling_means,
        "summary": summary, "pairs": pair_rows, "runs": runs,
        "distribution_reference": {"what": "scene-CLIP FID/KID of the held-out images' two halves (real vs real, "
                                           f"{half} vs {count - half})", **(reference or {})},
        "notes": plan.notes, "seconds": {"total": round(time.perf_counter() - started, 1), "runs": seconds},
        "per_image": per_image,
    }
    samples_of["source"] = plan.sources
    return result, samples_of


def _lists(scores: dict) -> dict:
    return {c: {m: v.tolist() for m, v in s.items()} for c, s in scores.items()}


def summarise(names: Sequence[str], pairs: Sequence[tuple[str, str]], runs: dict[str, Any],
              floor: dict[str, dict[str, float | None]], floor_shifted: dict[str, dict[str, float | None]],
              ceiling: dict[str, dict[str, float | None]]) -> tuple[list[dict], list[dict]]:
    """(summary rows, pair rows) from the runs' mean scores, the floor (none against scene k, and against
    scene k + 1 for a pair's second condition) and the ceiling; see ``evaluate``'s result."""
    summary = []
    for name in names:
        for measure in MEASURES[name]:
            if measure not in ceiling.get(name, {}):
                continue
            f, c = floor[name][measure], ceiling[name][measure]
            single = runs.get(name, {}).get("scores", {}).get(name, {}).get(measure)
            if name not in runs and "all" not in runs:
                continue  # neither run was made (evaluate --runs)
            everything = runs.get("all", {}).get("scores", {}).get(name, {}).get(measure)
            summary.append({"condition": name, "measure": measure, "primary": measure == MEASURES[name][0],
                            "floor": f, "single": single, "all": everything, "ceiling": c,
                            "gap_closed": _gap(single, f, c), "gap_closed_all": _gap(everything, f, c)})
    pair_rows = []
    for a, b in pairs:
        label, row = f"{a} + {b}", {"pair": f"{a} + {b}", "first_from": "scene k", "second_from": "scene k + 1"}
        verdicts = []
        for which, name, floors in (("first", a, floor), ("second", b, floor_shifted)):
            measure = MEASURES[name][0]
            pair_score = runs[label]["scores"].get(name, {}).get(measure)
            single = runs.get(name, {}).get("scores", {}).get(name, {}).get(measure)
            base = floors.get(name, {}).get(measure)  # none's score against the scenes the pair took it from
            single_base = floor.get(name, {}).get(measure)  # ... and against the single run's scenes
            kept = None
            if None not in (pair_score, single, base, single_base) and single - single_base > GAP_EPSILON:
                kept = (pair_score - base) / (single - single_base)
            ratio = pair_score / single if None not in (pair_score, single) and abs(single) > GAP_EPSILON else None
            row[which] = {"condition": name, "measure": measure, "single": single, "pair": pair_score, "floor": base,
                          "kept_gain": kept, "ratio": ratio}
            verdicts.append(None if kept is None else kept >= KEEP_THRESHOLD)
        row["both_keep_90"] = None if None in verdicts else all(verdicts)
        pair_rows.append(row)
    return summary, pair_rows
