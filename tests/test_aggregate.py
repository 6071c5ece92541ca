"""usi/studies/aggregate.py: means and standard errors over seeds, paired gains, expectations, comparison."""
import hashlib
import math

import pytest

from usi import recipe as recipe_mod
from usi.studies import aggregate
from usi.studies.table_spec import Row


def run(seed, kd, top1, **extra):
    return {"name": f"seed{seed}/m-{'kd' if kd else 'nokd'}", "seed": seed, "kd": kd,
            "metrics": {"top1": top1, "ece": 1.0, "agreement": 50.0}, **extra}


def test_mean_and_standard_error_of_the_mean():
    mean, se = aggregate.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert aggregate.mean_se([7.0]) == (7.0, None) and aggregate.mean_se([]) == (None, None)
    assert aggregate.mean_se([1.0, float("nan"), None, 3.0]) == (2.0, 1.0)


def test_the_gain_comes_from_paired_seeds_and_is_tighter_than_unpaired():
    # seed effects shared by both runs of a seed (10, 20, 30): the pairs cancel them
    runs = [run(0, False, 10.0), run(0, True, 12.0), run(1, False, 20.0), run(1, True, 23.0),
            run(2, False, 30.0), run(2, True, 31.0), run(3, True, 99.0)]  # seed 3 has no partner
    gain, se, n = aggregate.paired_gain(runs)
    assert (gain, n) == (2.0, 3) and se == pytest.approx(math.sqrt(1.0 / 3))
    row = aggregate.student_row(Row("m", "m"), runs, kd_kinds=(False, True), tolerance=1.0)
    assert row["top1_nokd"] == 20.0 and row["seeds_kd"] == 4 and row["gain"] == 2.0
    unpaired = math.hypot(row["top1_kd_se"], row["top1_nokd_se"])
    assert row["gain_se"] < unpaired / 10


def test_a_row_short_of_its_expected_top1_is_flagged_and_failures_are_noted():
    runs = [run(0, True, 70.0), run(1, True, 72.0), {**run(2, True, 0.0), "metrics": None, "failure": "it broke"}]
    row = aggregate.student_row(Row("m", "m", expect=75.0), runs, kd_kinds=(True,), tolerance=1.0)
    assert row["vs_expected"] == -4.0 and "4.0 under the expected 75 (tolerance 1)" in row["note"]
    assert "seed2/m-kd: it broke" in row["note"] and row["seeds_kd"] == 2 and row["gain"] is None
    close = aggregate.student_row(Row("m", "m", expect=71.5), runs, kd_kinds=(True,), tolerance=1.0)
    assert close["vs_expected"] == -0.5 and "expected" not in close["note"]


def test_the_recipe_hash_ignores_where_a_run_lives_and_nothing_else(tmp_path):
    for name, tree in (("a", {"run": {"dir": "x"}}), ("b", {"run": {"dir": "y", "resume": "auto"}}),
                       ("c", {"run": {"dir": "x"}, "optim": {"lr": 0.1}})):
        (tmp_path / name).mkdir()
        recipe_mod.from_tree({"model": {"name": "test_resnet"}, **tree}).save(tmp_path / name / "recipe.yaml")
    a, b, c = (aggregate.recipe_hash(tmp_path / n) for n in "abc")
    assert a == b != c and aggregate.recipe_hash(tmp_path / "none") is None


def test_provenance_names_versions_commit_recipe_and_teacher_file(tmp_path):
    teacher = tmp_path / "t.bin"
    teacher.write_bytes(b"weights")
    summary = {"versions": {"usi": "0.1.0", "timm": "1.0.31", "torch": "2.14.1", "git": "abc+dirty"}}
    p = aggregate.provenance(tmp_path, summary, aggregate.sha256(teacher))
    assert p["git"] == "abc+dirty" and p["timm"] == "1.0.31"
    assert p["teacher_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert aggregate.sha256(tmp_path / "missing") is None


def test_compare_says_what_moved_beyond_its_error():
    old = [{"model": "a", "top1_kd": 70.0, "top1_kd_se": 0.2, "runs": [{"provenance": {"timm": "1.0.30"}}]},
           {"model": "gone", "top1_kd": 1.0}]
    new = [{"model": "a", "top1_kd": 71.0, "top1_kd_se": 0.2, "runs": [{"provenance": {"timm": "1.0.31"}}]},
           {"model": "b", "top1_kd": 5.0}]
    lines = aggregate.compare(old, new)
    assert lines[0].startswith("a: top1_kd 70.00 -> 71.00 (+1.00, SE 0.28, beyond 2 SE)")
    assert "code, versions or recipe differ" in lines[0]
    assert lines[1:] == ["b: new row", "gone: gone from the new table"]
