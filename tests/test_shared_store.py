"""usi/studies/shared_store.py: a run's soft-label facts from its recipe alone, and who shares the store."""
from usi import recipe as recipe_mod
from usi.runtime import distributed
from usi.studies import shared_store
from usi.studies.jobs import Job, settings
from usi.training.build import build_training
from usi.training.stored_teacher import run_facts

from conftest import TINY
from helpers import teacher_file

STAND_INS = {"data.files", "steps_per_epoch", "teacher"}  # what only a run can know: the files, the steps, the sha


def tree_of(*overrides):
    tree = recipe_mod.read_yaml(recipe_mod.recipe_path("quickstart"))
    return settings(tree, list(TINY) + list(overrides))


def test_the_planned_facts_are_the_runs_own_but_for_the_stand_ins(image_root, tmp_path):
    weights = teacher_file(tmp_path / "t.safetensors")
    tree = tree_of(f"data.root={image_root}", "teacher.name=test_resnet", f"teacher.weights={weights}",
                   "model.name=test_efficientnet", "aug.auto_augment=rand-m7-mstd0.5-inc1")
    planned = shared_store.plan_facts(tree, nproc=1)
    real = run_facts(build_training(recipe_mod.from_tree(tree), distributed.Dist(), dry=True))
    assert planned.keys() == real.keys()
    assert {k: planned[k] for k in real if k not in STAND_INS} == {k: real[k] for k in real if k not in STAND_INS}
    assert planned["teacher"]["weights"] == str(weights) and real["teacher"]["weights"].startswith("sha256:")
    assert planned["normalization.mean"] == [0.485, 0.456, 0.406] and planned["student"]["name"] == "test_efficientnet"


def test_the_store_comes_from_the_row_most_rows_can_read_and_the_others_say_why(tmp_path):
    def kd(name, model, *extra):
        return Job(name, tree_of("data.root=/d", "teacher.name=test_resnet", "data.workers=2", f"model.name={model}",
                                 *extra), needs=("teacher",))

    # without a fixed fill the fill is the student's mean: the two 0.5-normalized rows outvote the first
    rows = [kd("seed0/eff-kd", "test_efficientnet"), kd("seed0/res-kd", "test_resnet"), kd("seed0/nf-kd", "test_nfnet")]
    store = shared_store.share(rows, seed=0, nproc=1, folder=tmp_path / "s", top_k=None)
    assert store.tree["model"]["name"] == "test_resnet" and store.args == () and store.needs == ("teacher",)
    assert rows[0].note.startswith("live teacher, not the seed's store: aug.randaugment_fill: the store has [128, ")
    assert rows[2].tree["teacher"]["soft_labels"] == str(tmp_path / "s") and rows[2].needs[-1] == "seed0/soft-labels"
    broken = [kd("seed0/x-kd", "not_a_model")]  # its run fails on its own line; the plan does not
    assert shared_store.share(broken, seed=0, nproc=1, folder=tmp_path / "s", top_k=2) is None
    assert broken[0].note.startswith("live teacher: its facts are unknown (UsageError") and broken[0].needs == ("teacher",)
