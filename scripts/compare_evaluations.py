"""Side by side: the per-condition table of several `composer-diffusion evaluate` reports (results.md).

    python scripts/compare_evaluations.py "old=docs/evaluate-demo.md" "new=runs/eval-new/results.md"

For each condition's measure: the floor (none) and ceiling (source) of the first report, then each report's
single and all scores with their share of the floor-to-ceiling gap. Reports must come from the same
held-out scenes and seeds (evaluate prints both at the top of results.md) to be comparable.
FID rows (scene-CLIP FID per run) follow.

    python scripts/compare_evaluations.py --paired "shipped=eval/a/results.md" "new=eval/b/results.md"

--paired adds, for every later report, each measure's mean difference from the first report over the same
scenes (single and all runs), with its paired standard error, read from the results.json beside each
results.md: a difference under two standard errors is within the noise of this many scenes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse(path: Path) -> tuple[dict[tuple[str, str], list[str]], dict[str, str], str]:
    rows, fids, header = {}, {}, ""
    for line in path.read_text().splitlines():
        if not header and line.strip() and not line.startswith("#"):
            header = line.strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("condition", "---") and not cells[0].startswith("-"):
            rows[(cells[0], cells[1])] = cells[2:]
        elif len(cells) == 4 and _number(cells[1]):  # the FID table (the pairs table has text there)
            fids[cells[0]] = cells[1]
    if not rows:
        raise SystemExit(f"error: {path} has no per-condition table (is it an evaluate results.md?)")
    return rows, fids, header


def paired_difference(first: list[float], other: list[float]) -> tuple[float, float]:
    """Mean of other - first over the same scenes and its standard error (sample sd / sqrt(n))."""
    if len(first) != len(other) or len(first) < 2:
        raise SystemExit(f"error: paired scores need the same scenes in both reports ({len(first)} against "
                         f"{len(other)}); evaluate both with the same --shards, --num and --seed")
    diffs = [b - a for a, b in zip(first, other)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def per_image(results_md: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    path = results_md.with_name("results.json")
    if not path.is_file():
        raise SystemExit(f"error: --paired needs {path} beside {results_md} (evaluate writes both)")
    return json.loads(path.read_text())["per_image"]


def paired_table(reports: list[tuple[str, Path]]) -> None:
    first_label, scores = reports[0][0], [per_image(p) for _, p in reports]
    print("\n| condition | measure | run | " + " | ".join(
        f"{label} - {first_label} (se)" for label, _ in reports[1:]) + " |")
    print("|" + "---|" * (3 + len(reports) - 1))
    first = scores[0]
    conditions = [n for n in first if n not in ("source", "none", "all") and " + " not in n]
    conditions += [n for n in first.get("all", {}) if n not in conditions]
    for condition in conditions:
        for run in (condition, "all"):
            for measure, base in first.get(run, {}).get(condition, {}).items():
                if not isinstance(base, list):
                    continue
                cells = []
                for other in scores[1:]:
                    got = other.get(run, {}).get(condition, {}).get(measure)
                    if got is None:
                        cells.append("n/a")
                        continue
                    mean, error = paired_difference(base, got)
                    cells.append(f"{mean:+.3f} ({error:.3f})")
                print(f"| {condition} | {measure} | {'single' if run == condition else run} | "
                      + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="LABEL=results.md")
    parser.add_argument("--paired", action="store_true",
                        help="add mean differences from the first report with paired standard errors")
    args = parser.parse_args(argv)
    reports, paths = [], []
    for item in args.reports:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"error: {item!r} must be LABEL=path/to/results.md")
        reports.append((label, *parse(Path(path))))
        paths.append((label, Path(path)))
    for label, _, _, header in reports:
        print(f"- {label}: {header[:160]}")
    first = reports[0][1]
    head = "| condition | measure | none | source | " + " | ".join(
        f"{label} single (gap) | {label} all (gap)" for label, *_ in reports) + " |"
    print("\n" + head)
    print("|" + "---|" * (4 + 2 * len(reports)))
    for key, cells in first.items():
        line = f"| {key[0]} | {key[1]} | {cells[0]} | {cells[3]} |"
        for _, rows, _, _ in reports:
            got = rows.get(key)
            line += " n/a | n/a |" if got is None else f" {got[1]} ({got[4]}) | {got[2]} ({got[5]}) |"
        print(line)
    runs = [r for r in reports[0][2]]
    if runs:
        print("\n| run | " + " | ".join(f"{label} scene-CLIP FID" for label, *_ in reports) + " |")
        print("|" + "---|" * (1 + len(reports)))
        for run in runs:
            print(f"| {run} | " + " | ".join(fids.get(run, "n/a") for _, _, fids, _ in reports) + " |")
    if args.paired and len(paths) > 1:
        paired_table(paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
