"""usi/training/build.py: the batch plan, the optimizer, the dry run, what a run holds."""
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

from usi import recipe as R
from usi.errors import UsageError
from usi.training import build

from conftest import TINY, read_jsonl, usi_main
from helpers import one_error, teacher_files, train, train_args


def test_gradient_accumulation_reaches_the_global_batch(image_root, tmp_path):
    out = train(image_root, tmp_path / "acc", "optim.global_batch=16", "sched.epochs=1", "sched.warmup_epochs=0")
    assert out.returncode == 0, out.stderr
    assert "global batch 16 = 8 x 1 processes x 2 accumulation" in out.stderr
    steps = len(read_jsonl(tmp_path / "acc" / "metrics.jsonl"))
    assert steps == 1 and torch.load(tmp_path / "acc" / "last.pt")["num_updates"] == 64 // 8 // 2


def test_layer_decay_scales_the_lr_per_layer():
    recipe = R.load(None, ["model.name=test_resnet", "optim.layer_decay=0.5"])
    opt = build.create_optimizer(recipe, timm.create_model("test_resnet", num_classes=4), lr=1e-3)
    scales = sorted({round(g["lr_scale"], 4) for g in opt.param_groups})
    assert scales[-1] == 1.0 and scales[0] < 0.1 and len(scales) > 3


def test_a_dry_run_checks_everything_writes_nothing_and_prints_the_plan(image_root, tmp_path):
    teacher = tmp_path / "t.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(teacher))
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={teacher}",
                               "optim.global_batch=16"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "r").exists()
    for line in ("model:\n  name: test_resnet", "64 train / 12 val images, 4 classes", "teacher: test_resnet",
                 "global batch 16 = 8 x 1 processes x 2 accumulation", "8 per epoch x 2 epochs = 16 steps, 8 updates"):
        assert line in out.stdout, line
    wrong = tmp_path / "t10.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(wrong))
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={wrong}"),
                   "--dry-run")
    assert out.returncode == 2 and "predicts 10 classes but the dataset has 4" in out.stderr


def test_the_ema_copy_carries_no_feature_hook(image_root, tmp_path):
    from usi import recipe as recipe_mod
    from usi.runtime import distributed
    from usi.training import build

    (path,) = teacher_files(tmp_path, ("test_resnet",))
    recipe = recipe_mod.load(None, [*TINY, f"data.root={image_root}", f"run.dir={tmp_path / 'run'}",
                                    "teacher.name=test_resnet", f"teacher.weights={path}",
                                    "features.student=layer3", "features.teacher=layer4"])
    t = build.build_training(recipe, distributed.Dist())
    assert t.state.student.layer3._forward_hooks and not t.state.ema.module.layer3._forward_hooks
    trained = {id(p) for p in t.state.trained_parameters()}
    assert all(id(p) in trained for p in t.state.projector.parameters())
    assert all(id(p) in trained for p in t.state.student.parameters())


def test_the_batch_plan_accumulates_to_the_global_batch_or_scales_the_lr():
    from usi.errors import UsageError
    from usi.training.build import batch_plan

    recipe = R.load(None, ["data.batch_size=128", "optim.global_batch=1024", "optim.lr=2e-3"])
    assert batch_plan(recipe, 8) == (1, 2e-3, "global batch 1024 = 128 x 8 processes x 1 accumulation")
    assert batch_plan(recipe, 2)[:2] == (4, 2e-3)  # fewer GPUs: accumulate, the lr unchanged
    with pytest.raises(UsageError, match="optim.global_batch=1024 is not a multiple of data.batch_size x processes"):
        batch_plan(recipe, 3)
    linear = R.load(None, ["data.batch_size=128", "optim.global_batch=1024", "optim.lr=2e-3",
                           "optim.batch_rule=linear"])
    accum, lr, line = batch_plan(linear, 2)
    assert accum == 1 and lr == pytest.approx(2e-3 * 256 / 1024) and "(linear)" in line
    sqrt = R.load(None, ["data.batch_size=128", "optim.global_batch=1024", "optim.lr=2e-3", "optim.batch_rule=sqrt"])
    assert batch_plan(sqrt, 2)[1] == pytest.approx(2e-3 * 0.5)


@pytest.mark.parametrize("extra, numbers", [
    # 64 images, batch 8: 8 steps an epoch, short of the 100 steps one update of 800 accumulates
    (["optim.global_batch=800"], "64 training samples is 8 steps of data.batch_size=8 x 1 processes, fewer than "
                                 "the 100 accumulated steps of one update (optim.global_batch=800); set "
                                 "optim.global_batch to at most 64"),
    (["optim.global_batch=16", "run.max_steps=1"], "is 1 steps (run.max_steps=1) of data.batch_size=8"),  # a smoke test's cap too
])
@pytest.mark.parametrize("dry", [True, False])
def test_a_recipe_that_makes_no_update_is_refused_before_any_run_directory(image_root, tmp_path, extra, numbers,
                                                                           dry):
    """It used to train nothing, print 'done', exit 0 and save its random weights as the best."""
    out = usi_main(*train_args(image_root, tmp_path / "r", *extra), *(["--dry-run"] if dry else []))
    one_error(out, "this recipe makes no optimizer update: an epoch of 64 training samples")
    assert numbers in out.stderr and not (tmp_path / "r").exists()


def test_a_run_that_never_leaves_its_warm_up_is_refused():
    """The epoch rule of usi/recipe/checking.py keeps warm-up shorter than the run; counted in updates
    here, the guard holds where a run is built whatever a recipe's check let through."""
    recipe = R.load(None, ["sched.epochs=3", "sched.warmup_epochs=2"])
    build.check_updates(recipe, steps=8, accum=2, world=1, samples=64)  # 12 updates, 8 of warm-up
    recipe.sched.warmup_epochs = 3
    with pytest.raises(UsageError, match="never leaves its warm-up: 12 optimizer updates in all, "
                                         "sched.warmup_epochs=3 x 4 updates per epoch = 12"):
        build.check_updates(recipe, steps=8, accum=2, world=1, samples=64)


def test_the_dry_run_plan_shows_names_from_outside_escaped(image_root, tmp_path):
    """A folder name with a line break stays on its plan line: no line of the plan can be forged."""
    root = tmp_path / "x\nusi: error: forged"
    shutil.copytree(image_root, root)
    out = usi_main(*train_args(root, tmp_path / "r"), "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    plan = out.stdout.split("# the plan (nothing was written)\n", 1)[1]
    assert not any(line.startswith("usi: error") for line in plan.splitlines())
    assert "x\\nusi: error: forged: 64 train / 12 val images" in plan
