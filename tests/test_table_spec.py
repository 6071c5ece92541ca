"""usi/studies/table_spec.py: a table file checked in one line per mistake, and the runs it plans."""
import pytest
import yaml

from usi.errors import UsageError
from usi.studies import table_spec
from usi.studies.table_spec import Row

GOOD = {
    "recipe": "quickstart",
    "overrides": {"data.root": "/data", "sched": {"epochs": 3}},
    "teacher": {"name": "test_resnet", "overrides": {"sched.epochs": 6}},
    "models": ["test_resnet", {"name": "test_vit", "overrides": {"model.kwargs": {"patch_size": 4},
                                                                  "optim.lr": 0.001}, "expect": 50}],
    "kd": "both", "seeds": [0, 1], "jobs": 2, "nproc": 1, "out": "runs/t",
}


def spec_of(tree, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(tree))
    return table_spec.load(path)


def test_a_table_file_reads_into_rows_seeds_and_flattened_overrides(tmp_path):
    spec = spec_of(GOOD, tmp_path)
    assert [r.label for r in spec.rows] == ["test_resnet", "test_vit"] and spec.rows[1].expect == 50
    assert spec.overrides == {"data.root": "/data", "sched.epochs": 3} and spec.seeds == [0, 1]
    assert spec.teacher.name == "test_resnet" and spec.teacher.label == "teacher" and spec.jobs == 2


@pytest.mark.parametrize("change, message", [
    ({"modles": ["x"]}, "unknown key 'modles'; did you mean 'models'?"),
    ({"models": []}, "models: lists at least one model"),
    ({"models": ["a", "a"]}, "model 'a' is listed twice; give one of them a label"),
    ({"models": [{"name": "a", "overides": {}}]}, "unknown key 'overides'; did you mean 'overrides'?"),
    ({"models": [{"name": "a", "label": "x/y"}]}, "label 'x/y' must be a plain name"),
    ({"models": [{"name": "a", "expect": "high"}]}, "expect must be a top-1 in percent"),
    ({"models": [7]}, "a model is a timm name or"),
    ({"seeds": [0, 0]}, "seeds must be distinct whole numbers"),
    ({"seeds": [-1]}, "seeds must be distinct whole numbers"),
    ({"kd": "yes"}, "kd must be one of on, off, both"),
    ({"jobs": 0}, "jobs must be a whole number >= 1"),
    ({"nproc": 1.5}, "nproc must be a whole number >= 1"),
    ({"tolerance": -1}, "tolerance must be a number"),
    ({"overrides": ["a=1"]}, "overrides must be a mapping"),
    ({"recipe": None}, "recipe: names the shared recipe"),
    ({"share_teacher": "yes"}, "share_teacher must be true or false, not 'yes'"),
    ({"share_teacher": True, "top_k": 0}, "top_k must be a whole number >= 1"),
    ({"top_k": 10}, "top_k sizes the shared soft-label store: it needs share_teacher: true"),
])
def test_every_mistake_is_one_line_naming_it(tmp_path, change, message):
    with pytest.raises(UsageError) as e:
        spec_of({**GOOD, **change}, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value) and "t.yaml" in str(e.value)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(UsageError, match="table file .*t.yaml must be a mapping"):
        spec_of(["resnet50"], tmp_path)


def test_only_changes_beyond_the_architecture_are_deviations():
    row = Row("vit", "test_vit", {"model.name": "x", "model.kwargs": {"patch_size": 4, "drop_path_rate": 0.1},
                                  "optim.lr": 0.001, "data.input_size": 32})
    assert table_spec.deviations(row) == {"optim.lr": 0.001, "data.input_size": 32, "model.kwargs.drop_path_rate": 0.1}
    assert table_spec.deviations(Row("r", "resnet18", {"model.kwargs": {"patch_size": 4}})) == {}


def test_the_plan_trains_the_teacher_first_then_every_seed_model_and_kind(tmp_path):
    spec = spec_of(GOOD, tmp_path)
    todo = table_spec.plan(spec, ["run.amp=none"])
    names = [j.name for j in todo]
    assert names[0] == "teacher" and len(names) == 1 + 2 * 2 * 2
    assert "seed1/test_vit-kd" in names and "seed0/test_resnet-nokd" in names
    jobs = {j.name: j for j in todo}
    teacher, kd, nokd = jobs["teacher"], jobs["seed1/test_vit-kd"], jobs["seed1/test_vit-nokd"]
    assert teacher.tree["sched"]["epochs"] == 6 and teacher.tree["teacher"]["name"] is None
    assert kd.needs == ("teacher",) and nokd.needs == ()
    assert kd.tree["teacher"]["weights"] == "runs/t/teacher/best.safetensors" and kd.tree["run"]["seed"] == 1
    assert nokd.tree["teacher"]["name"] is None and nokd.tree["optim"]["lr"] == 0.001
    assert kd.tree["model"]["kwargs"] == {"patch_size": 4} and kd.tree["run"]["amp"] == "none"
    assert kd.tree["sched"]["epochs"] == 3  # the table's overrides, not the teacher's
    # KD off: no teacher is trained, and no run waits for one
    off = table_spec.plan(spec_of({**GOOD, "kd": "off"}, tmp_path))
    assert [j.name for j in off] == ["seed0/test_resnet-nokd", "seed0/test_vit-nokd", "seed1/test_resnet-nokd",
                                     "seed1/test_vit-nokd"]


SHARED = {**GOOD, "seeds": [0], "share_teacher": True, "top_k": 3,
          "overrides": {"data.root": "/data", "data.input_size": 16, "data.workers": 2, "run.device": "cpu",
                        "aug.randaugment_fill": [124, 116, 104]},
          "models": ["test_resnet", "test_efficientnet",  # normalized by 0.5 and by ImageNet's mean/std
                     {"name": "test_resnet", "label": "big", "overrides": {"data.input_size": 32}}]}


def test_share_teacher_plans_one_store_per_seed_read_by_every_kd_row_whose_facts_match(tmp_path):
    todo = {j.name: j for j in table_spec.plan(spec_of({**SHARED, "seeds": [0, 1]}, tmp_path))}
    store, kd, vit, big = (todo[n] for n in ("seed1/soft-labels", "seed1/test_resnet-kd", "seed1/test_efficientnet-kd",
                                             "seed1/big-kd"))
    assert list(todo).index("seed1/soft-labels") < list(todo).index("seed1/test_resnet-kd")
    assert store.command == "soft-labels" and store.args == ("--top-k", "3") and store.needs == ("teacher",)
    assert store.tree["run"]["seed"] == 1 and store.tree["teacher"].get("soft_labels") is None
    # other families share it: the fill is fixed, so only the rounding of the normalization differs
    for job in (kd, vit):
        assert job.tree["teacher"]["soft_labels"] == "runs/t/seed1/soft-labels" and not job.note
        assert job.needs == ("teacher", "seed1/soft-labels")
    assert big.tree["teacher"].get("soft_labels") is None and big.needs == ("teacher",)
    assert big.note.startswith("live teacher, not the seed's store: data.input_size: the store has 16, this run 32")
    assert todo["seed1/test_resnet-nokd"].tree["teacher"].get("soft_labels") is None
    assert not todo["seed0/test_efficientnet-kd"].note and "seed0/soft-labels" in todo["seed0/test_efficientnet-kd"].needs


def test_without_a_fixed_fill_or_with_workers_0_rows_of_other_students_run_the_live_teacher(tmp_path):
    unfixed = {**SHARED["overrides"], "aug.randaugment_fill": None}
    todo = {j.name: j for j in table_spec.plan(spec_of({**SHARED, "overrides": unfixed}, tmp_path))}
    assert todo["seed0/soft-labels"].tree["model"]["name"] == "test_resnet"  # no row shares more: the first
    assert todo["seed0/test_efficientnet-kd"].note.startswith("live teacher, not the seed's store: aug.randaugment_fill")
    assert not todo["seed0/test_resnet-kd"].note and todo["seed0/soft-labels"].args == ("--top-k", "3")
    main_process = {**SHARED["overrides"], "data.workers": 0}  # the student's dropout draws share the stream
    todo = {j.name: j for j in table_spec.plan(spec_of({**SHARED, "overrides": main_process}, tmp_path))}
    assert todo["seed0/test_efficientnet-kd"].note.startswith("live teacher, not the seed's store: student")
    assert not todo["seed0/test_resnet-kd"].note
    # KD off, or share_teacher off: no store
    off = [j.name for j in table_spec.plan(spec_of({**SHARED, "kd": "off"}, tmp_path))]
    assert not any("soft-labels" in n for n in off)
    plain = {j.name: j for j in table_spec.plan(spec_of({**SHARED, "share_teacher": False, "top_k": None}, tmp_path))}
    assert "seed0/soft-labels" not in plain and plain["seed0/test_resnet-kd"].tree["teacher"].get("soft_labels") is None
