"""scripts/compare_evaluations.py --paired: differences over the same scenes with their standard errors."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_evaluations  # noqa: E402


def write_report(folder: Path, single: list[float], together: list[float]) -> Path:
    """A results.md with one per-condition row and its results.json, as evaluate writes them."""
    folder.mkdir()
    (folder / "results.md").write_text(
        "64 held-out scenes, seeds 0..3\n\n"
        "| condition | measure | none (floor) | single | all | source (ceiling) | gap single | gap all |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| sketch | edge_f1 | 0.2 | {sum(single) / 4:.3f} | {sum(together) / 4:.3f} | 1.0 | 50 % | 60 % |\n")
    per_image = {"sketch": {"sketch": {"edge_f1": single}}, "all": {"sketch": {"edge_f1": together}}}
    (folder / "results.json").write_text(json.dumps({"per_image": per_image}))
    return folder / "results.md"


def test_paired_difference_is_the_mean_difference_with_its_standard_error():
    mean, error = compare_evaluations.paired_difference([0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert mean == pytest.approx(0.5)
    assert error == pytest.approx(math.sqrt(1 / 3) / 2)  # differences 1, 0, 1, 0: sd sqrt(1/3), n = 4


def test_paired_difference_refuses_different_scenes():
    with pytest.raises(SystemExit, match="same scenes"):
        compare_evaluations.paired_difference([0.0, 1.0], [1.0, 1.0, 1.0])


def test_paired_table_rows(tmp_path, capsys):
    old = write_report(tmp_path / "old", [0.5, 0.6, 0.7, 0.8], [0.9, 0.9, 0.9, 0.9])
    new = write_report(tmp_path / "new", [0.6, 0.7, 0.8, 0.9], [0.9, 0.9, 0.9, 1.3])
    assert compare_evaluations.main(["--paired", f"old={old}", f"new={new}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sketch | edge_f1 |")]
    assert "| sketch | edge_f1 | single | +0.100 (0.000) |" in rows
    assert "| sketch | edge_f1 | all | +0.100 (0.100) |" in rows  # differences 0, 0, 0, 0.4


def test_paired_needs_results_json(tmp_path):
    old = write_report(tmp_path / "old", [0.5] * 4, [0.9] * 4)
    new = write_report(tmp_path / "new", [0.5] * 4, [0.9] * 4)
    (tmp_path / "new" / "results.json").unlink()
    with pytest.raises(SystemExit, match="results.json"):
        compare_evaluations.main(["--paired", f"old={old}", f"new={new}"])


def test_paired_table_without_an_all_run(tmp_path, capsys):
    reports = []
    for name, scores in (("old", [0.5, 0.5, 0.5, 0.5]), ("new", [0.7, 0.5, 0.7, 0.5])):
        path = write_report(tmp_path / name, scores, scores)
        data = json.loads(path.with_name("results.json").read_text())
        del data["per_image"]["all"]  # evaluate --runs sketch: no all run
        path.with_name("results.json").write_text(json.dumps(data))
        reports.append(f"{name}={path}")
    assert compare_evaluations.main(["--paired", *reports]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sketch | edge_f1 |")]
    assert rows[-1] == "| sketch | edge_f1 | single | +0.100 (0.058) |"  # differences 0.2, 0, 0.2, 0
