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
                 "global batch 16 = 8 x 1 processes x 2 accumulation", "8 per epoch x 2 epochs = 16 steps, 8 updates",
                 "initial weights: random initialization (timm's, seed 42)",
                 # timm's cosine: warm-up from 1e-4 over 4 updates, then the cosine (of the whole run) to 1e-6
                 "lr: 0.0001 at update 0 (start), 0.001 at update 4 (end of warm-up, middle), 7.71e-05 at update 7 (last update)"):
        assert line in out.stdout, line
    from usi.models import forward_macs
    macs = forward_macs(timm.create_model("test_resnet", num_classes=4), 16)
    assert f"0.37M params, {macs / 1e9:.3g} GMACs per image, input 16 px" in out.stdout
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


def test_minival_is_the_same_images_for_every_seed_and_model_and_never_trained_on(image_root, tmp_path):
    from usi.runtime import distributed

    def built(*extra):
        recipe = R.load(None, [*TINY, f"data.root={image_root}", f"run.dir={tmp_path / 'r'}", "data.minival=8",
                               *extra])
        return build.build_training(recipe, distributed.Dist(), dry=True)

    a, b = built("run.seed=1"), built("run.seed=2", "model.name=test_efficientnet")
    assert a.minival_split.samples == b.minival_split.samples and len(a.minival_split) == 8
    assert a.selection == "minival (8 images)" and len(a.train_split) == 56
    trained = {path for path, _ in a.train_loader.loader.dataset.split.samples}  # what the train loader reads
    assert trained and not trained & {path for path, _ in a.minival_split.samples}
    assert a.minival_loader.dataset.split is a.minival_split
    out = usi_main(*train_args(image_root, tmp_path / "r", "data.minival=8"), "--dry-run")
    assert "56 train / 12 val images, 4 classes; best weights selected on minival (8 images)" in out.stdout


def built(image_root, tmp_path, *extra):
    from usi.runtime import distributed

    recipe = R.load(None, [*TINY, f"data.root={image_root}", f"run.dir={tmp_path / 'run'}", *extra])
    return build.build_training(recipe, distributed.Dist())


def test_grad_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(image_root, tmp_path):
    grads, counts = [], []
    for flag in ("false", "true"):
        student = built(image_root, tmp_path, f"model.grad_checkpointing={flag}").state.student
        assert student.grad_checkpointing == (flag == "true")  # timm's own switch, set by the key
        torch.manual_seed(0)
        student.train()(torch.randn(4, 3, 16, 16)).logsumexp(1).sum().backward()
        grads.append([p.grad for p in student.parameters()])
        counts.append(int(student.layer2[0].bn1.num_batches_tracked))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # the recompute in the backward pass ran the block again (its BatchNorm counted the batch twice, as in timm)
    assert counts == [1, 2]


def test_the_optimizer_takes_the_recipe_betas_momentum_and_kwargs():
    model = timm.create_model("test_resnet", num_classes=4)
    sgd = R.load(None, ["optim.name=sgd", "optim.momentum=0.8", "optim.kwargs={nesterov: false, dampening: 0.1}"])
    group = build.create_optimizer(sgd, model, lr=1e-3).param_groups[0]
    assert (group["momentum"], group["nesterov"], group["dampening"]) == (0.8, False, 0.1)
    adamw = R.load(None, ["optim.betas=[0.8, 0.95]", "optim.kwargs={amsgrad: true, foreach: true}"])
    group = build.create_optimizer(adamw, model, lr=1e-3).param_groups[0]
    assert (group["betas"], group["amsgrad"], group["foreach"], group["fused"]) == ((0.8, 0.95), True, True, None)
    assert build.create_optimizer(R.load(None, []), model, lr=1e-3).param_groups[0]["fused"]  # usi's default
    # what the optimizer itself refuses (torch: nesterov needs momentum) is one line too
    with pytest.raises(UsageError, match=r"optim.name='sgd' with optim.kwargs \{'nesterov': True\}: .*[Nn]esterov"):
        build.create_optimizer(R.load(None, ["optim.name=sgd", "optim.momentum=0", "optim.kwargs={nesterov: true}"]),
                               model, lr=1e-3)


def test_layer_decay_names_its_learning_rates_in_one_line():
    recipe = R.load(None, ["optim.layer_decay=0.5"])
    model = timm.create_model("test_resnet", num_classes=4)
    opt = build.create_optimizer(recipe, model, lr=1e-3)
    line = build.layer_lrs(opt, model, 1e-3, 0.5)
    assert line == (f"layer decay 0.5: {len(opt.param_groups)} param groups at 6 peak learning rates, 3.13e-05 .. "
                    f"0.001: 3.13e-05 conv1.0.weight, 6.25e-05 layer1.0.conv1.weight, 0.000125 layer2.0.conv1.weight, "
                    f"..., 0.0005 layer4.0.conv1.weight, 0.001 fc.weight")


def test_sync_bn_converts_every_batchnorm_under_ddp_and_nothing_with_one_process():
    from timm.layers import BatchNormAct2d

    from usi.runtime.distributed import Dist

    model = timm.create_model("test_efficientnet", num_classes=4).eval()  # timm's BatchNormAct2d
    x = torch.randn(2, 3, 32, 32)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    assert build.sync_batchnorm(model, Dist()) is model and not any(
        isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())  # one process: as timm, no change
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert BatchNormAct2d in kinds
    model = build.sync_batchnorm(model, Dist(world=2, device=torch.device("cuda", 0)))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert model.state_dict().keys() == state.keys()  # checkpoints, EMA and exports see the same weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(x), before)  # eval mode: no synchronization; activations kept


def test_sync_bn_on_cpu_processes_is_one_line_as_torch_refuses_cpu_tensors(image_root, tmp_path):
    import torch.distributed as torch_dist

    # torch itself: once a process group exists, SyncBatchNorm's training forward refuses CPU tensors
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            torch.nn.SyncBatchNorm(3).train()(torch.randn(4, 3, 2, 2))
    finally:
        torch_dist.destroy_process_group()
    out = train(image_root, tmp_path / "r", "run.sync_bn=true", "data.batch_size=4", torchrun=2)
    one_line = [x for x in out.stderr.splitlines() if x.startswith("usi: error:")]
    assert out.returncode != 0 and len(one_line) == 1, out.stderr[-2000:]
    assert "run.sync_bn=true needs GPUs: torch's SyncBatchNorm refuses CPU tensors (2 CPU processes)" in one_line[0]
    assert not (tmp_path / "r").exists()


def test_the_new_keys_train_and_survive_a_resume(image_root, tmp_path):
    """data.class_map, model.grad_checkpointing, optim.momentum/kwargs, layer decay's log line and run.sync_bn
    (one process: no change) through a run stopped after one epoch and resumed."""
    import json

    from safetensors import safe_open

    run = tmp_path / "run"
    keys = ["data.class_map=[ring, circle]", "optim.name=sgd", "optim.momentum=0.8", "optim.kwargs={nesterov: false}",
            "optim.layer_decay=0.7", "run.sync_bn=true"]
    first = train(image_root, run, *keys, "model.grad_checkpointing=true", "run.stop_after=1")
    assert first.returncode == 0, first.stderr[-2000:]
    other_map = train(image_root, run, "data.class_map=[circle, ring]", *keys[1:], "run.resume=auto")
    assert other_map.returncode == 2 and "cannot resume" in other_map.stderr and "classes" in other_map.stderr
    other_momentum = train(image_root, run, *keys, "optim.momentum=0.9", "run.resume=auto")
    assert other_momentum.returncode == 2 and "optim.momentum was 0.8, now 0.9" in other_momentum.stderr
    # checkpointing does not change what is trained: it may be switched off on resume
    again = train(image_root, run, *keys, "model.grad_checkpointing=false", "run.resume=auto")
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-2000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["classes"] == ["ring", "circle"]  # the map's order, not the folders'
    groups = last["optimizer"]["param_groups"]
    assert {(g["momentum"], g["nesterov"]) for g in groups} == {(0.8, False)} and len(groups) > 2
    with safe_open(str(run / "best.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["ring", "circle"]
    assert "layer decay 0.7: " in (run / "log.txt").read_text()
    report = usi_main("eval", str(run / "best.safetensors"), f"data.root={image_root}", "--json")
    assert report.returncode == 0, report.stderr[-2000:]
    assert json.loads(report.stdout)["students"]["raw"]["count"] == 2 * 3  # the other classes' images left out
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
