"""usi/studies/table_plan.py: a table as launch commands and a Slurm array, nothing run."""
import shlex

import pytest
import yaml

from usi import recipe as recipe_mod
from usi.errors import UsageError
from usi.studies import table_plan, table_spec
from usi.studies.table_spec import Row, TableSpec


def spec(tmp_path, **kw):
    return TableSpec(recipe="quickstart", rows=[Row("test_resnet", "test_resnet"), Row("test_vit", "test_vit")],
                     overrides={"data.root": str(tmp_path)}, teacher=Row("teacher", "test_resnet"), seeds=[0, 1],
                     out=tmp_path / "out", **kw)


def test_the_plan_writes_each_runs_recipe_its_command_and_a_requeueable_array(tmp_path):
    s = spec(tmp_path, nproc=4)
    todo = table_spec.plan(s)
    written = table_plan.write_plan(todo, s.out, nproc=4)
    plan = s.out / "plan"
    assert {p.name for p in written} == {"runs.txt", "slurm.sh", "submit.sh", "teacher.txt", "slurm-teacher.sh"}
    lines = (plan / "runs.txt").read_text().splitlines()
    assert len(lines) == 8 and all(line.startswith("torchrun --standalone --nproc_per_node=4 -m usi train ")
                                   for line in lines)
    recipe_file = shlex.split(lines[-1])[-1]
    tree = yaml.safe_load(open(recipe_file))
    assert tree["run"]["resume"] == "auto" and tree["run"]["dir"] == str(s.out / "seed1/test_vit-kd")
    assert tree["teacher"]["weights"] == str(s.out / "teacher" / "best.safetensors") and tree["run"]["seed"] == 1
    array = (plan / "slurm.sh").read_text()
    assert "#SBATCH --array=0-7" in array and "--requeue" in array and "--gpus-per-node=4" in array
    assert 'eval "exec $line"' in array  # the task becomes torchrun: Slurm's SIGTERM reaches it
    submit = (plan / "submit.sh").read_text()
    assert "sbatch --parsable slurm-teacher.sh" in submit and "--dependency=afterok:${teacher} slurm.sh" in submit
    assert "seed" not in (plan / "teacher.txt").read_text() and "#SBATCH --array=0-0" in (plan / "slurm-teacher.sh").read_text()


def test_one_process_runs_plain_python_and_no_teacher_means_no_dependency(tmp_path):
    s = spec(tmp_path, kd="off")
    written = table_plan.write_plan(table_spec.plan(s), s.out, nproc=1)
    assert {p.name for p in written} == {"runs.txt", "slurm.sh", "submit.sh"}
    lines = (s.out / "plan" / "runs.txt").read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("python -m usi train ") for line in lines)
    assert (s.out / "plan" / "submit.sh").read_text().endswith("sbatch slurm.sh\n")
    assert recipe_mod.load(shlex.split(lines[0])[-1]).model.name == "test_resnet"  # a valid recipe


def test_a_bad_run_is_refused_before_any_file_is_written(tmp_path):
    s = spec(tmp_path)
    s.rows.append(Row("bad", "no_such_model"))
    with pytest.raises(UsageError, match="is not a timm model"):
        table_plan.write_plan(table_spec.plan(s), s.out, nproc=1)
    assert not (s.out / "plan").exists()


def test_share_teacher_adds_the_stores_as_a_stage_between_teacher_and_students(tmp_path):
    s = spec(tmp_path, share_teacher=True, top_k=2)
    written = table_plan.write_plan(table_spec.plan(s), s.out, nproc=1)
    plan = s.out / "plan"
    assert {"soft-labels.txt", "slurm-soft-labels.sh"} <= {p.name for p in written}
    stores = (plan / "soft-labels.txt").read_text().splitlines()
    assert len(stores) == 2 and shlex.split(stores[1])[-4:] == ["--out", str(s.out / "seed1/soft-labels"), "--top-k",
                                                                "2"]
    assert shlex.split(stores[1])[:4] == ["python", "-m", "usi", "soft-labels"]
    assert len((plan / "runs.txt").read_text().splitlines()) == 8
    submit = (plan / "submit.sh").read_text()
    assert "soft_labels=$(sbatch --parsable --dependency=afterok:${teacher} slurm-soft-labels.sh)" in submit
    assert submit.endswith("sbatch --dependency=afterok:${soft_labels} slurm.sh\n")
