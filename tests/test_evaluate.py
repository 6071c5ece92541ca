"""usi/evaluation/evaluate.py: one exact pass, every model on the same batch: fp32 logits, ensemble members."""
import json

import pytest
from conftest import read_jsonl, usi_main
from helpers import ensemble_args, teacher_files, train


def test_an_ensemble_run_reports_fidelity_to_the_ensemble_and_each_member(image_root, tmp_path):
    paths = teacher_files(tmp_path)
    out = train(image_root, tmp_path / "run", *ensemble_args(paths))
    assert out.returncode == 0, out.stderr
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["train"]["kd_loss"] > 0
    for variant in ("raw", "ema"):
        members = record[variant]["members"]
        assert len(members) == 3 and all(0 <= m["agreement"] <= 100 and m["kl"] >= 0 for m in members)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    teacher = summary["teacher_metrics"]
    assert teacher["count"] == 12 and len(teacher["members"]) == 3
    assert summary["teacher"] == "test_resnet + test_efficientnet + test_resnet"
    assert [m["name"] for m in teacher["members"]] == ["test_resnet", "test_efficientnet", "test_resnet"]
    # the members are different networks: their KLs to the student differ, and so do their own NLLs
    assert len({round(m["kl"], 6) for m in record["raw"]["members"]}) == 3
    assert len({round(m["nll"], 6) for m in teacher["members"]}) == 3

    # usi eval: the stored recipe's member files are never opened; the command line names the ensemble
    alone = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}", "--json")
    assert alone.returncode == 0 and "teacher not evaluated" in alone.stderr
    assert "teacher" not in json.loads(alone.stdout)
    again = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                     *ensemble_args(paths)[1:], "--json")
    assert again.returncode == 0, again.stderr
    # the other members alone would leave the first teacher to timm's hub: refused in one line
    partial = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                       *ensemble_args(paths)[2:])
    assert partial.returncode == 2 and "pass teacher.weights=... for the first teacher too" in partial.stderr
    report = json.loads(again.stdout)
    assert report["teacher_cached"]  # the training run cached the ensemble's val logits
    assert report["teacher"]["name"] == "test_resnet + test_efficientnet + test_resnet"
    assert [m["name"] for m in report["teacher"]["members"]] == ["test_resnet", "test_efficientnet", "test_resnet"]
    best = summary["best"]["weights"]
    recorded = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                    if r["epoch"] == summary["best"]["epoch"])[best]["members"]
    evaluated = report["students"][best]["members"]
    assert len(evaluated) == len(recorded) == 3
    for got, expected in zip(evaluated, recorded):  # pytest.approx takes no list of dicts (pytest >= 9.1)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected)
    text = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                    *ensemble_args(paths)[1:])
    assert "2: test_efficientnet" in text.stdout and "against" in text.stdout
