"""The studies' shared policy (usi/studies/jobs.py): reuse, resume, refusal and the job pool, without training."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from usi import recipe as recipe_mod
from usi.errors import UsageError
from usi.studies import jobs
from usi.studies.jobs import Job, RunFailed

BASE = {"model": {"name": "test_resnet"}, "data": {"root": "data"}, "sched": {"epochs": 4, "warmup_epochs": 1}}


def finished(run_dir, tree, best=50.0):
    """A run directory as a finished run leaves it: its recipe and its summary."""
    run_dir.mkdir(parents=True)
    recipe_mod.from_tree(tree).save(run_dir / "recipe.yaml")
    (run_dir / "summary.json").write_text(json.dumps({"best": {"value": best}}))


def test_settings_are_data_and_later_layers_win():
    tree = jobs.settings(BASE, {"sched.epochs": 24, "data.root": "a: b # c"}, ["sched.epochs=2"],
                         {"teacher.extra": [{"name": "test_resnet", "weights": "w"}]})
    assert tree["sched"]["epochs"] == 2 and tree["data"]["root"] == "a: b # c"
    assert BASE["sched"]["epochs"] == 4  # the base is not changed
    (root,) = jobs.as_overrides({"data.root": "a: b # c"})
    assert recipe_mod.parse_override(root) == ("data.root", "a: b # c")


def test_a_finished_run_is_reused_only_for_the_same_recipe(tmp_path):
    run_dir = tmp_path / "r"
    assert jobs.decide(recipe_mod.from_tree(BASE), run_dir, rerun=False) == "train"
    finished(run_dir, BASE)
    # resume_free fields (data.root) may differ
    same = jobs.recipe_for(Job("r", jobs.settings(BASE, {"data.root": "elsewhere"})), run_dir, rerun=False)
    assert jobs.decide(same, run_dir, rerun=False) == "reuse"
    other = jobs.recipe_for(Job("r", jobs.settings(BASE, {"sched.epochs": 5})), run_dir, rerun=False)
    # the remedy is one a study's user has (a study sets run.dir itself)
    with pytest.raises(UsageError, match="finished run of another recipe: sched.epochs was 4, now 5; "
                                         "pass --rerun to train it again, or another --out$"):
        jobs.decide(other, run_dir, rerun=False)
    assert jobs.decide(other, run_dir, rerun=True) == "train"
    (run_dir / "summary.json").unlink()  # unfinished: resumed, under the same rule
    assert jobs.decide(same, run_dir, rerun=False) == "resume"
    with pytest.raises(UsageError, match="cannot resume .*sched.epochs was 4, now 5"):
        jobs.decide(other, run_dir, rerun=False)


def test_the_pool_runs_jobs_after_their_needs_reuses_and_keeps_going(tmp_path, capsys):
    finished(tmp_path / "teacher", BASE, best=64.6)
    started = []

    def work(recipe, log):
        name = recipe.run_dir().name
        started.append(name)
        if name == "broken":
            raise RunFailed("it broke")
        return {"best": {"value": 1.0}, "name": name}

    todo = [Job("student", BASE, needs=("teacher",)), Job("teacher", BASE), Job("broken", BASE),
            Job("bad", jobs.settings(BASE, {"model.name": "no_such_model"})),
            Job("after-broken", BASE, needs=("broken",))]
    with ThreadPoolExecutor(1) as pool:
        out = jobs.run_all(todo, tmp_path, pool=pool, workers=1, rerun=False, tag="t", start=0.0, work=work,
                           keep_going=True)
    assert out["teacher"].reused and out["teacher"].summary["best"]["value"] == 64.6
    assert started == ["student", "broken"]  # what needs a job that failed is not started: it could only fail
    assert out["after-broken"].failure == "not run: broken did not finish"
    assert out["student"].summary["name"] == "student" and out["broken"].failure == "it broke"
    assert "is not a timm model" in out["bad"].failure
    printed = capsys.readouterr().out
    assert "reusing teacher: already finished: best top-1 64.6" in printed and "training student" in printed
    with ThreadPoolExecutor(1) as pool, pytest.raises(RunFailed):
        jobs.run_all([Job("broken", BASE)], tmp_path, pool=pool, workers=1, rerun=False, tag="t", start=0.0,
                     work=work)


def test_a_finished_study_run_of_another_recipe_is_not_reused(image_root, tmp_path):
    base = recipe_mod.read_yaml(recipe_mod.recipe_path("quickstart"))

    def run_once(overrides, run_dir, rerun):  # one quickstart-recipe run in this process, by the policy
        return jobs.run_here(Job(run_dir.name, jobs.settings(base, overrides)), run_dir, rerun)

    small = ["data.batch_size=8", "optim.global_batch=8", "data.input_size=16", "data.workers=0",
             "teacher.name=null", f"data.root={image_root}", "sched.warmup_epochs=0"]
    first = run_once([*small, "sched.epochs=1"], tmp_path / "run", rerun=False)
    assert run_once([*small, "sched.epochs=1"], tmp_path / "run", rerun=False) == first  # reused
    with pytest.raises(Exception, match="finished run of another recipe: sched.epochs was 1, now 2; pass --rerun"):
        run_once([*small, "sched.epochs=2"], tmp_path / "run", rerun=False)
    assert run_once([*small, "sched.epochs=2"], tmp_path / "run", rerun=True)["epochs"] == 2
