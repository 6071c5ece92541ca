"""`usi table` (usi/studies/tables.py): one recipe, many backbones, on tiny models, CPU."""
import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from usi.errors import UsageError

from conftest import REPO, TINY
from helpers import ENV, children, epochs_done, one_error, run_tool, wait_for


def test_bench_table_runs_each_model_skips_finished_ones_and_survives_a_failure(image_root, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(teacher))
    overrides = [o for o in TINY if not o.startswith(("model.", "teacher."))] + [
        f"data.root={image_root}", "sched.epochs=1", "sched.warmup_epochs=0", "teacher.name=test_resnet",
        f"teacher.weights={teacher}"]
    args = ["-m", "usi", "table", "recipes/quickstart.yaml", *overrides, "--models", "test_efficientnet",
            "not_a_model", "--nproc", "1", "--out", str(tmp_path / "table"), "--device", "cpu"]
    out = run_tool(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "table" / "table.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    good, bad = rows["test_efficientnet"], rows["not_a_model"]
    assert float(good["top1_kd"]) >= 0 and float(good["top1_nokd"]) >= 0
    assert 0 <= float(good["agreement_kd"]) <= 100 and float(good["kl_kd"]) >= 0 and float(good["gmacs"]) > 0
    assert "is not a timm model" in bad["note"]
    assert (tmp_path / "table" / "table.png").stat().st_size > 1000
    assert (tmp_path / "table" / "seed0" / "test_efficientnet-kd.eval.json").is_file()  # kept: a rerun evaluates nothing
    again = run_tool(*args)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2


def test_usi_table_takes_overrides_before_or_after_its_flags():
    from usi.studies.tables import parse
    args = parse(["recipes/usi.yaml", "--nproc", "8", "--out", "runs/t", "data.root=/data/imagenet"])
    assert args.overrides == ["data.root=/data/imagenet"] and args.nproc == 8 and args.models is None
    args = parse(["recipes/usi.yaml", "optim.lr=1e-3", "--models", "resnet50", "vit_small_patch16_224",
                  "data.root=/d"])
    assert args.models == ["resnet50", "vit_small_patch16_224"] and args.overrides == ["optim.lr=1e-3", "data.root=/d"]
    with pytest.raises(SystemExit):
        parse(["recipes/usi.yaml", "--nproc", "1", "--bogus"])


def test_bench_table_composes_with_an_ensemble_and_feature_kd(image_root, tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / f"teacher{i}.safetensors")
        save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(files[-1]))
    overrides = [o for o in TINY if not o.startswith(("model.", "teacher."))] + [
        f"data.root={image_root}", "sched.epochs=1", "sched.warmup_epochs=0", "teacher.name=test_resnet",
        f"teacher.weights={files[0]}", f"teacher.extra=[{{name: test_resnet, weights: {files[1]}}}]",
        "features.student=layer3", "features.teacher=layer4"]
    out = run_tool("-m", "usi", "table", "recipes/quickstart.yaml", *overrides, "--models", "test_resnet",
                   "--nproc", "1", "--out", str(tmp_path / "table"), "--device", "cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "table" / "table.csv") as f:
        teacher, row = csv.DictReader(f)
    assert teacher["model"] == "teacher (test_resnet)" and float(teacher["top1_nokd"]) >= 0
    assert float(row["top1_nokd"]) >= 0 and not row["note"]  # the baseline row drops teacher and features
    report = json.loads((tmp_path / "table" / "seed0" / "test_resnet-kd.eval.json").read_text())["report"]
    (metrics,) = report["students"].values()
    assert len(metrics["members"]) == 2  # evaluated against the whole ensemble, each member too
    log = (tmp_path / "table" / "seed0" / "test_resnet-kd.log").read_text()
    assert "feature KD: student layer3 -> teacher layer4" in log


def test_bench_table_survives_a_first_model_that_fails_before_any_folder_exists(image_root, tmp_path):
    overrides = [o for o in TINY if not o.startswith(("model.", "teacher."))] + [
        f"data.root={image_root}", "sched.epochs=1", "sched.warmup_epochs=0", "data.input_size=18"]
    out_dir = tmp_path / "new" / "table"  # does not exist yet
    out = run_tool("-m", "usi", "table", "recipes/quickstart.yaml", *overrides, "model.kwargs={patch_size: 4}",
                   "--models", "test_vit", "--kd", "off", "--nproc", "1", "--out", str(out_dir), "--device", "cpu")
    # its only run failed before its folder existed: one line saying why, and no table of nothing
    one_error(out, "no run of the table has finished (1 of 1 did not: seed0/test_vit-nokd: usi: error: "
                   "model.name=test_vit with model.kwargs {'patch_size': 4} fails on 18 px inputs")
    assert not (out_dir / "table.csv").exists()


SMALL = {"data.root": None, "data.input_size": 16, "data.batch_size": 8, "data.eval_batch_size": 8,
         "data.workers": 0, "optim.global_batch": 8, "sched.epochs": 2, "sched.warmup_epochs": 1, "run.device": "cpu",
         "run.amp": "none", "run.channels_last": False, "run.log_interval": 2, "ema.decay": 0.9}


def table_file(tmp_path, root, **changes):
    tree = {"recipe": "quickstart", "overrides": {**SMALL, "data.root": str(root)},
            "teacher": {"name": "test_resnet"},
            "models": [{"name": "test_vit", "overrides": {"model.kwargs": {"patch_size": 4}, "optim.lr": 0.003},
                        "expect": 99}],
            "kd": "both", "seeds": [0, 1], "jobs": 2, "out": str(tmp_path / "out"), **changes}
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_table_file_trains_its_teacher_then_every_seed_in_parallel_and_reports_mean_se_and_paired_gain(
        image_root, tmp_path):
    path = table_file(tmp_path, image_root)
    out = run_tool("-m", "usi", "table", str(path), "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    teacher, vit = saved["rows"]
    final = json.loads((tmp_path / "out" / "teacher" / "summary.json").read_text())["best"]
    assert teacher["model"] == "teacher (test_resnet)" and teacher["top1_nokd"] == final["value"]
    for saved_eval in (tmp_path / "out").glob("seed*/*.eval.json"):  # every student against the final teacher,
        report = json.loads(saved_eval.read_text())["report"]      # never the one still training beside it
        assert report["teacher"]["top1"] == final["value"], saved_eval
    assert vit["kind"] == "ViT" and vit["family"] == "vision_transformer" and vit["seeds_kd"] == 2
    assert vit["params_m"] == pytest.approx(sum(p.numel() for p in timm.create_model(
        "test_vit", num_classes=4, img_size=16, patch_size=4).parameters()) / 1e6)  # 4 classes, not 1000
    tops = {(r["seed"], r["kd"]): r["metrics"]["top1"] for r in vit["runs"]}
    assert vit["gain"] == pytest.approx((tops[0, True] - tops[0, False] + tops[1, True] - tops[1, False]) / 2)
    assert vit["top1_kd_se"] is not None and vit["gain_se"] is not None and vit["paired_seeds"] == 2
    assert vit["deviates"] == "optim.lr=0.003" and "under the expected 99" in vit["note"]
    assert vit["train_proc_s"] > 0 and vit["selection"] == "val"
    prov = {r["name"]: r["provenance"] for r in vit["runs"]}
    kd_sha = prov["seed0/test_vit-kd"]["teacher_sha256"]
    assert len(kd_sha) == 64 and prov["seed0/test_vit-nokd"]["teacher_sha256"] is None
    assert prov["seed0/test_vit-kd"]["recipe_sha256"] != prov["seed1/test_vit-kd"]["recipe_sha256"]  # seeds
    assert prov["seed0/test_vit-kd"]["timm"] == timm.__version__
    md = (tmp_path / "out" / "table.md").read_text()
    assert " ± " in md and "| ViT | vision_transformer |" in md
    # KD and no-KD runs of a seed saw the same data order: the seed's two logs start with the same loss
    assert "2 seeds [0, 1], 5 runs (0 reused), 2 at a time" in out.stdout
    # the same command again: every run reused, nothing evaluated again; --collect and --compare agree
    again = run_tool("-m", "usi", "table", str(path), "--device", "cpu", "--compare", str(tmp_path / "out" / "table.json"))
    assert again.returncode == 0 and again.stdout.count("already finished") == 5, again.stderr[-2000:]
    assert "test_vit: top1_nokd" in again.stdout and "(+0.00" in again.stdout
    collected = run_tool("-m", "usi", "table", str(path), "--collect", "--device", "cpu")
    assert collected.returncode == 0 and "missing" not in collected.stdout
    assert json.loads((tmp_path / "out" / "table.json").read_text())["rows"][1]["gain"] == vit["gain"]


def test_collect_names_the_runs_that_are_missing_and_plan_runs_nothing(image_root, tmp_path):
    path = table_file(tmp_path, image_root, kd="off", seeds=[3])
    plan = run_tool("-m", "usi", "table", str(path), "--plan")
    assert plan.returncode == 0 and "planned 1 runs; nothing was run" in plan.stdout, plan.stderr[-2000:]
    assert (tmp_path / "out" / "plan" / "slurm.sh").is_file() and not (tmp_path / "out" / "seed3").exists()
    out = run_tool("-m", "usi", "table", str(path), "--collect", "--device", "cpu")
    one_error(out, "no run of the table has finished (1 of 1 did not: seed3/test_vit-nokd: missing (not started))")
    assert not (tmp_path / "out" / "table.json").exists()  # nothing written, an older table would stay


@pytest.mark.parametrize("change, message", [
    ({"modles": []}, "unknown key 'modles'; did you mean 'models'?"),
    ({"teacher": None, "kd": "on"}, "kd=on needs a teacher: the recipe quickstart has none"),
    ({"overrides": {"optim.lrr": 1}}, "unknown key optim.lrr"),
    ({"jobs": 64}, None),  # fine on a CPU: the cores are shared (not run: --plan)
    ({"models": [{"name": "test_vit", "overrides": {"run.seed": 5}}]}, "run.seed is the table's to set"),
    ({"models": [{"name": "test_vit", "overrides": {"teacher.name": "test_vit"}}]}, "teacher.name is the table's"),
    ({"overrides": {"model.name": "test_vit"}}, "model.name is the table's to set for each run"),
    ({"models": [{"name": "test_vit", "label": "a\nb"}]}, "must be a plain name of letters"),
    ({"kd": ["on"]}, "kd must be one of on, off, both, not ['on']"),
    ({"seeds": [[0]]}, "seeds must be distinct whole numbers"),
    ({"tolerance": float("nan")}, "tolerance must be a number of top-1 points"),
    ({"kd": True, "teacher": None}, "kd=on needs a teacher"),  # YAML's bare `on`
])
def test_a_bad_table_file_is_one_line_and_runs_nothing(image_root, tmp_path, change, message):
    path = table_file(tmp_path, image_root, **change)
    out = run_tool("-m", "usi", "table", str(path), "--plan")
    if message is None:
        assert out.returncode == 0, out.stderr[-2000:]
        return
    one_error(out, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0", "0"], "seeds must be distinct whole numbers >= 0, not [0, 0]"),
    (["model.name=test_vit"], "model.name is the table's to set for each run"),
    (["run.dir=/elsewhere"], "run.dir is the table's to set for each run"),
    (["--compare", "{fifo}"], "is not a regular file (a named pipe)"),
    (["--compare", "{bad_json}"], "not a usi table.json (its rows are not table rows)"),
    (["--out", "{a_file}"], "out"),
])
def test_bad_command_lines_are_one_line_before_anything_runs(image_root, tmp_path, args, message):
    import os
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"model": "x", "top1_kd": "abc"}]}))
    (tmp_path / "a_file").write_text("x")
    args = [a.format(fifo=tmp_path / "fifo", bad_json=tmp_path / "bad.json", a_file=tmp_path / "a_file") for a in args]
    from usi.studies import tables
    with pytest.raises(UsageError) as e:
        tables.main([str(table_file(tmp_path, image_root)), *args])
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_recipe_without_data_here_is_refused_once_before_any_run(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")  # a recipe of defaults: the paper's models on data/imagenet
    out = run_tool("-m", "usi", "table", str(empty), "--out", str(tmp_path / "t"))
    one_error(out, "has no train/ folder here; set data.root (or plan the runs for another machine with --plan)")
    assert not (tmp_path / "t").exists()


def test_a_finished_run_of_another_recipe_stops_the_table_before_anything_runs(image_root, tmp_path):
    from usi import recipe as recipe_mod
    from usi.studies import table_spec, tables
    spec = table_spec.load(table_file(tmp_path, image_root, kd="off", seeds=[0]))
    (job,) = table_spec.plan(spec)
    run_dir = spec.out / job.name
    run_dir.mkdir(parents=True)
    recipe_mod.from_tree(job.tree, ["sched.epochs=3"]).save(run_dir / "recipe.yaml")
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match="is a finished run of another recipe: sched.epochs was 3, now 2; pass --rerun"):
        tables.refuse_other_recipes([job], spec.out)


def test_a_store_of_another_top_k_stops_the_table_and_is_never_reused(tmp_path):
    from usi.distill import soft_labels as store
    from usi.studies import jobs, tables
    folder = tmp_path / "seed0" / "soft-labels"
    folder.mkdir(parents=True)
    asks = {k: jobs.Job("seed0/soft-labels", {}, command="soft-labels", args=a)
            for k, a in ((2, ("--top-k", "2")), (3, ("--top-k", "3")), (None, ()))}
    for complete in (True, False):  # finished, or stopped part-way before top_k was changed
        store.write_manifest(folder, {"format": store.FORMAT, "facts": {}, "classes": 4, "top_k": 2,
                                      "steps_per_chunk": 1, "complete": complete, "chunks": {}})
        tables.refuse_other_recipes([asks[2]], tmp_path)  # the same K: fine
        for k in (3, None):  # top_k changed in the table file, or removed (every class)
            with pytest.raises(UsageError, match=f"holds a top-2 soft-label store, the table asks for top-{k or 4}; "
                                                 f"pass --rerun"):
                tables.refuse_other_recipes([asks[k]], tmp_path)
            assert jobs.other_top_k(store.read_manifest(folder), asks[k])


def test_sigterm_stops_every_run_with_a_checkpoint_and_the_same_command_resumes(image_root, tmp_path):
    path = table_file(tmp_path, image_root, kd="off", overrides={**SMALL, "data.root": str(image_root),
                                                                 "sched.epochs": 20})
    table = subprocess.Popen([sys.executable, "-m", "usi", "table", str(path), "--device", "cpu"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    runs = [tmp_path / "out" / f"seed{s}" / "test_vit-nokd" for s in (0, 1)]
    wait_for(lambda: all(epochs_done(r) >= 1 for r in runs), [table])
    children_before = children(table.pid)
    table.send_signal(signal.SIGTERM)
    stdout, stderr = table.communicate(timeout=120)
    assert table.returncode == 143, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("usi: error")]
    assert len(errors) <= 1 and "Traceback" not in stderr
    assert "every run wrote its checkpoint; the same command resumes them" in stderr
    assert all((r / "last.pt").is_file() and not (r / "summary.json").exists() for r in runs)
    assert children_before and not any(Path(f"/proc/{pid}").exists() and
                                       open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in children_before)
    again = run_tool("-m", "usi", "table", str(path), "--device", "cpu")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("(resuming its last checkpoint)") == 2
    assert all(epochs_done(r) == 20 for r in runs)  # 20: under load neither run ends before the signal


def test_share_teacher_stops_mid_store_pass_resumes_and_trains_kd_rows_with_the_live_teachers_weights(
        image_root, tmp_path):
    # a teacher slow enough to stop mid-pass: resnet50 at 96 px (about half a second a step on one thread)
    teacher = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("resnet50", num_classes=4).state_dict(), str(teacher))
    overrides = {**SMALL, "data.root": str(image_root), "sched.epochs": 2, "teacher.name": "resnet50",
                 "teacher.weights": str(teacher), "teacher.input_size": 96}
    tables = {}
    for share in (True, False):  # table_file writes table.yaml: each under its own name
        tables[share] = table_file(tmp_path, image_root, teacher=None, kd="on", seeds=[0], jobs=1, overrides=overrides,
                                   models=["test_resnet"], out=str(tmp_path / ("shared" if share else "live")),
                                   **({"share_teacher": True} if share else {})).rename(tmp_path / f"{share}.yaml")
    path, out_dir = tables[True], tmp_path / "shared"
    table = subprocess.Popen([sys.executable, "-m", "usi", "table", str(path), "--device", "cpu"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    folder = out_dir / "seed0" / "soft-labels"
    wait_for(lambda: any(folder.glob("*.sha256")), [table])  # epoch 1's chunk is written, epoch 2's is not
    children_before = children(table.pid)
    table.send_signal(signal.SIGTERM)
    stdout, stderr = table.communicate(timeout=120)
    assert table.returncode == 143, stderr[-2000:]
    assert "every run wrote its checkpoint; the same command resumes them" in stderr and "Traceback" not in stderr
    assert "stopped by SIGTERM" in (out_dir / "seed0" / "soft-labels.log").read_text()
    assert len(list(folder.glob("*.sha256"))) == 1 and not json.loads((folder / "manifest.json").read_text())["complete"]
    assert not (out_dir / "seed0" / "test_resnet-kd").exists()  # the KD row waits for the store
    assert children_before and not any(Path(f"/proc/{pid}").exists() and
                                       open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in children_before)
    tops, weights = {}, {}
    for share in (True, False):  # the same command finishes the store and the table; then the live table
        out_dir = tmp_path / ("shared" if share else "live")
        out = run_tool("-m", "usi", "table", str(tables[share]), "--device", "cpu")
        assert out.returncode == 0, out.stderr[-3000:]
        (row,) = json.loads((out_dir / "table.json").read_text())["rows"][1:]
        (run,) = row["runs"]
        tops[share] = run["metrics"]["top1"]
        weights[share] = load_file(out_dir / "seed0" / "test_resnet-kd" / "best.safetensors")
        log = (out_dir / "seed0" / "test_resnet-kd.log").read_text()
        recipe = yaml.safe_load((out_dir / "seed0" / "test_resnet-kd" / "recipe.yaml").read_text())
        saved = json.loads((out_dir / "table.json").read_text())
        assert saved["spec"]["share_teacher"] is share and saved["spec"]["top_k"] is None
        used = run["provenance"]["soft_labels"]  # which labels the KD run trained on, in the table's record
        assert (used == {"folder": str(folder), "top_k": 4, "classes": 4}) if share else used is None
        if share:
            assert "training seed0/soft-labels" in out.stdout and not row["note"]
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["complete"] and len(manifest["chunks"]) == 2  # the kept chunk, and the one written now
            assert recipe["teacher"]["soft_labels"] == str(folder)
            assert "seed0/soft-labels (top-4 of 4 classes) answers for the teacher" in log
        else:
            assert recipe["teacher"]["soft_labels"] is None and "answers for the teacher" not in log
    # K = the class count: the stored logits are the teacher's, bit for bit, and so is the student trained on them
    assert tops[True] == tops[False] and weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
