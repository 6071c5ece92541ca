"""tools/*.py (throughput, gpu_report, loader_bench, kd_cost, topk_error, share_cost) on tiny models, CPU; `usi table` is in test_tables.py."""
import importlib.util
import json
import math
import shutil

import pytest
import yaml

from conftest import REPO, TINY
from helpers import run_tool, teacher_file


def test_throughput_reports_every_timing_and_ratio(tmp_path):
    out = run_tool("tools/throughput.py", "--models", "test_resnet", "--teacher", "test_efficientnet", "--batch", "8",
                   "--input-size", "32", "--classes", "10", "--warmup", "1", "--runs", "2", "--device", "cpu",
                   "--json", str(tmp_path / "t.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads((tmp_path / "t.json").read_text())
    for key in ("student_ms", "teacher_ms", "kd_ms", "timm_task_ms", "timm_teacher_ms", "overhead",
                "vs_timm_task", "teacher_speedup"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["overhead"] == row["kd_ms"] / (row["student_ms"] + row["teacher_ms"])
    assert "| test_resnet |" in out.stdout


def test_gpu_report_measures_every_section_on_this_device(tmp_path):
    out = run_tool("tools/gpu_report.py", "--small", "--out", str(tmp_path / "report.md"), timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for heading in ("Training step, teacher forward, MFU", "RandAugment on the device", "Loader", "End-to-end"):
        assert f"## {heading}" in report
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["model"] for r in data["steps"]] == ["test_resnet", "test_efficientnet", "test_vit"]
    for row in data["steps"]:
        for key in ("student_ms", "teacher_ms", "teacher_compiled_ms", "timm_teacher_ms", "kd_ms", "timm_task_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["overhead"] == row["kd_ms"] / (row["student_ms"] + row["teacher_ms"])
        assert row["tflops_per_step"] > 0 and row["mfu"] is None  # no peak known for a CPU
    assert data["randaugment"]["ms_per_batch"] > 0 and data["train"]["img_per_s"] > 0


def test_loader_bench_times_both_paths_from_folders_and_shards(tmp_path):
    from PIL import Image
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("RGB", (96, 72), (i * 40, 100, 200 - i * 30)).save(photos / f"n0000000{i % 2}_{i}.JPEG")
    out = run_tool("tools/loader_bench.py", str(photos), "--workers", "1", "--copies", "4", "--rounds", "1",
                   "--batch", "4", "--input-size", "32", "--shard-size", "6")
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| 1 |")]
    cells = [float(c) for c in row.strip("| \n").split(" | ")[1:]]
    assert len(cells) == 8 and all(c > 0 for c in cells)


def test_kd_cost_times_every_configuration_against_logit_kd():
    out = run_tool("tools/kd_cost.py", "--student", "test_resnet", "--teacher", "test_resnet", "--size", "16",
                   "--batch", "4", "--rounds", "2", "--student-layer", "layer3", "--teacher-layer", "layer4",
                   "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| ") and "configuration" not in line}
    assert list(rows) == ["no teacher", "logit KD", "ensemble of 2", "ensemble of 3", "feature KD",
                          "ensemble of 3 + feature KD"]
    assert rows["logit KD"][1] == "1.00" and float(rows["ensemble of 3"][0]) > 0
    one = float(rows["logit KD"][2])
    assert float(rows["ensemble of 2"][2]) == pytest.approx(2 * one) and float(rows["no teacher"][2]) == 0
    assert int(rows["feature KD"][3]) > 0 and int(rows["logit KD"][3]) == 0  # the projection's parameters


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds: must be at least 1"),
    (["--batch", "3", "--size", "16", "--student", "test_resnet", "--teacher", "test_resnet"], "must be even"),
    (["--student", "nosuch", "--size", "16"], "model.name='nosuch' is not a timm model"),
])
def test_kd_cost_bad_arguments_are_one_line(args, message):
    out = run_tool("tools/kd_cost.py", *args)
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr


# ---------------------------------------------------------------- tools/topk_error.py, tools/share_cost.py


def kd_table(tmp_path, root, *extra, models=("test_resnet", "test_efficientnet")):
    """A KD table file on the tiny recipe; data.workers=1, so the students' batches (and the store) are the
    same (with workers=0 the student's dropout draws would move the transforms' random stream)."""
    teacher = teacher_file(tmp_path / "teacher.safetensors")
    settings = [o for o in TINY if not o.startswith(("model.name", "teacher.name"))] + [
        f"data.root={root}", "data.workers=1", "teacher.name=test_resnet", f"teacher.weights={teacher}", *extra]
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in settings)}
    path = tmp_path / "table.yaml"
    path.write_text(json.dumps({"recipe": "quickstart", "overrides": overrides, "kd": "on", "seeds": [0],
                                "models": list(models), "out": str(tmp_path / "unused")}))
    return path


def tool_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fill, stores", [([], 2), (["aug.randaugment_fill=[124, 116, 104]"], 1)])
def test_topk_error_writes_one_exact_store_per_group_of_matching_facts(image_root, tmp_path, fill, stores):
    # the two students normalize differently, so RandAugment fills differently: a store each, unless the
    # fill is a recipe fact
    topk = tool_module("topk_error")
    args = topk.parse([str(kd_table(tmp_path, image_root, *fill)), "--out", str(tmp_path / "m")])
    _, todo = topk.kd_jobs(args)
    assert [[j.name for j in g] for g in topk.groups(todo)][:stores] == (
        [["seed0/test_resnet-kd"], ["seed0/test_efficientnet-kd"]] if stores == 2 else
        [["seed0/test_resnet-kd", "seed0/test_efficientnet-kd"]])
    assert len(topk.groups(todo)) == stores


def test_topk_error_measures_a_cut_store_against_the_exact_one(image_root, tmp_path):
    table = kd_table(tmp_path, image_root, models=["test_resnet"])
    out = run_tool("tools/topk_error.py", str(table), "--top-k", "4", "2", "--live", "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr[-3000:]
    # the top-K stores are cut from the exact one: no second teacher pass
    assert sorted(p.name for p in (tmp_path / "m" / "seed0").glob("*-store-?")) == [
        "exact-store-0", "top2-store-0", "top4-store-0"]
    rows = {r["k"]: r for r in json.loads((tmp_path / "m" / "topk-error.json").read_text())["rows"]}
    every = rows[4]  # K = the class count: the exact store again, so no error and the same run
    assert every["kd_rel_error_max_pct"] == "0.0" and every["tail_mass_mean_pct"] == "0.00"
    assert every["top1_diff"] == "0.00" and every["agreement_diff"] == "0.00"
    cut = rows[2]  # half the classes: a tail with mass, so the KD term moves
    assert float(cut["kd_rel_error_max_pct"]) > 0 and float(cut["tail_mass_mean_pct"]) > 0
    assert every["max_weight_diff_exact_vs_live"] == 0.0  # the exact store's run is the live run
    steps = json.loads((tmp_path / "m" / "seed0" / "test_resnet-top2" / "kd-error.json").read_text())
    assert len(steps["errors"]) == 2 * 8 and all(e >= 0 for e in steps["errors"])  # 2 epochs x 8 steps
    # --live-table: a finished table's KD runs stand for the live runs (its recipe checked); nothing retrains
    shutil.copytree(tmp_path / "m" / "seed0" / "test_resnet-live", tmp_path / "lt" / "seed0" / "test_resnet-kd")
    again = run_tool("tools/topk_error.py", str(table), "--top-k", "4", "2", "--live-table", str(tmp_path / "lt"),
                     "--out", str(tmp_path / "m"))
    assert again.returncode == 0 and "training" not in again.stdout, again.stderr[-3000:]
    assert [r["top1_diff"] for r in json.loads((tmp_path / "m" / "topk-error.json").read_text())["rows"]] == [
        r["top1_diff"] for r in rows.values()]
    (tmp_path / "lt" / "seed0" / "test_resnet-kd" / "summary.json").unlink()
    refused = run_tool("tools/topk_error.py", str(table), "--top-k", "2", "--live-table", str(tmp_path / "lt"),
                       "--out", str(tmp_path / "m"))
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].endswith("holds no finished run")


def test_share_cost_runs_the_table_live_and_shared(image_root, tmp_path):
    # both rows share the store (the fill fixed); one epoch is enough to time
    table = kd_table(tmp_path, image_root, "aug.randaugment_fill=[124, 116, 104]", "sched.epochs=1",
                     "sched.warmup_epochs=0")
    out = run_tool("tools/share_cost.py", str(table), "--out", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    report = json.loads((tmp_path / "c" / "share-cost.json").read_text())
    assert [r["run"] for r in report["rows"]] == ["seed0/test_efficientnet-kd", "seed0/test_resnet-kd"]
    own = report["rows"][1]  # the store was written with this row's recipe: its run is the live one
    assert own["top1_live"] == own["top1_store"] and "top-1 equal in both tables: " in report["summary"]
    for row in report["rows"]:  # both rows read the one store, each at a cost measured inside its training time
        assert 0 < row["read_ms_per_step"] < row["step_ms_store"] and row["teacher_share_pct"] is not None
    assert report["walls_s"]["live"] > 0 and report["walls_s"]["shared"] > 0
    assert "B per image per epoch" in report["summary"]


@pytest.mark.parametrize("tool, args, message", [
    ("topk_error", ["--top-k", "0"], "--top-k 0: each K must be 1..4"),
    ("topk_error", ["--top-k", "5"], "--top-k 5: each K must be 1..4"),
    ("share_cost", ["--out", "FILE"], "--out FILE is a file, not a folder"),
    ("share_cost", ["--out", ""], "--out must name a folder"),
    ("topk_error", ["--top-k", "2", "--out", "LINK"], "--out LINK is a symbolic link to nothing"),
    ("topk_error", ["--top-k", "2", "--out", "FILE/x"], "--out FILE/x cannot be created: FILE is not a writable"),
])
def test_the_soft_label_tools_refuse_bad_arguments_in_one_line_before_any_run(image_root, tmp_path, tool, args,
                                                                               message):
    table = kd_table(tmp_path, image_root, models=["test_resnet"])
    (tmp_path / "FILE").write_text("")
    (tmp_path / "LINK").symlink_to(tmp_path / "nowhere")
    paths = {"FILE": str(tmp_path / "FILE"), "LINK": str(tmp_path / "LINK")}
    args = [a.replace(a.split("/")[0], paths[a.split("/")[0]]) if a.split("/")[0] in paths else a for a in args]
    out = run_tool(f"tools/{tool}.py", str(table), *args, *([] if "--out" in args else ["--out", str(tmp_path / "o")]))
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith(f"{tool}: {message}".replace("FILE", paths["FILE"]).replace(
        "LINK", paths["LINK"])), last
    assert "Traceback" not in out.stderr and not (tmp_path / "o").exists()
    missing = run_tool(f"tools/{tool}.py", str(tmp_path / "nosuch.yaml"), "--out", str(tmp_path / "o"))
    assert missing.stderr.strip().splitlines()[-1] == f"{tool}: table file {tmp_path / 'nosuch.yaml'} does not exist"
