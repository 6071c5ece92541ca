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
