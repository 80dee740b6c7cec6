"""Side by side: the per-condition table of several `composer-diffusion evaluate` reports (results.md).

    python scripts/compare_evaluations.py "old=docs/evaluate-demo.md" "new=runs/eval-new/results.md"

For each condition's measure: the floor (none) and ceiling (source) of the first report, then each report's
single and all scores with their share of the floor-to-ceiling gap. Reports must come from the same
held-out scenes and seeds (evaluate prints both at the top of results.md) to be comparable.
FID rows (scene-CLIP FID per run) follow.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="LABEL=results.md")
    args = parser.parse_args(argv)
    reports = []
    for item in args.reports:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"error: {item!r} must be LABEL=path/to/results.md")
        reports.append((label, *parse(Path(path))))
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
