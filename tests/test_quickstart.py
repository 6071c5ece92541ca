"""The quickstart's whole path on a shrunken dataset: data, teacher, students with and without KD, table."""
import csv

import pytest

from usi.studies.quickstart import STUDENTS, quickstart

from conftest import usi_main
from helpers import one_error


def test_quickstart_pipeline_writes_its_table(tmp_path, capsys):
    rows = quickstart(tmp_path, seed=1, per_class=(8, 2),
                      extra=["sched.epochs=1", "sched.warmup_epochs=0", "data.batch_size=8", "optim.global_batch=8",
                             "data.input_size=16", "data.workers=0"])
    assert [r["model"] for r in rows] == [name for name, _ in STUDENTS]
    for r in rows:
        assert r["kind"] in ("CNN", "mobile", "ViT") and r["params_m"] > 0 and r["infer_img_s"] > 0
        assert 0 <= r["top1_nokd"] <= 100 and 0 <= r["top1_kd"] <= 100
        assert r["gain"] == r["top1_kd"] - r["top1_nokd"]
        assert 0 <= r["agreement_nokd"] <= 100 and 0 <= r["agreement_kd"] <= 100
        assert r["ece_kd"] >= 0 and r["train_img_s"] > 0
    with open(tmp_path / "table-seed1.csv") as f:
        assert [row["model"] for row in csv.DictReader(f)] == [r["model"] for r in rows]
    assert (tmp_path / "table-seed1.png").stat().st_size > 1000
    assert "| model |" in (tmp_path / "table-seed1.md").read_text()
    # a second call reuses every finished run
    again = quickstart(tmp_path, seed=1, per_class=(8, 2),
                       extra=["sched.epochs=1", "sched.warmup_epochs=0", "data.batch_size=8",
                              "optim.global_batch=8", "data.input_size=16", "data.workers=0"])
    assert [r["top1_kd"] for r in again] == [r["top1_kd"] for r in rows]
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 7 and "training teacher" in printed  # the first call trained, the second not


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_quickstart_out_that_cannot_be_a_folder_is_refused(tmp_path, where):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    out = usi_main("quickstart", "--out", str(blocker if where == "a file" else blocker / "sub"))
    one_error(out, "--out")


def test_quickstart_out_in_a_place_that_takes_no_files_is_one_line(tmp_path):
    one_error(usi_main("quickstart", "--out", "/proc/usi_quickstart_test"), "/proc/usi_quickstart_test")
