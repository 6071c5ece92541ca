from pathlib import Path

import pytest
import yaml

from usi import recipe as R
from usi.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def test_usi_recipe_matches_the_published_values():
    r = R.load(REPO / "recipes" / "usi.yaml")
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay) == ("adamw", 2e-3, 0.02)
    assert r.data.batch_size == 128 and r.optim.global_batch == 1024
    assert (r.sched.name, r.sched.epochs, r.sched.warmup_epochs) == ("cosine", 300, 5)
    assert (r.sched.warmup_lr, r.sched.min_lr) == (1e-4, 1e-6)
    assert r.aug.auto_augment == "rand-m7-mstd0.5-inc1"
    assert r.aug.scale == [0.08, 1.0] and r.aug.ratio == pytest.approx([3 / 4, 4 / 3])
    assert (r.aug.interpolation, r.aug.hflip, r.aug.color_jitter, r.aug.re_prob) == ("bicubic", 0.5, 0.0, 0.0)
    assert (r.aug.mixup_alpha, r.aug.cutmix_alpha, r.aug.mixup_prob, r.aug.mixup_switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert r.aug.repeats == 3 and r.aug.label_smoothing == 0.0 and r.aug.eval_crop_pct == 0.95
    assert r.ema.enabled and r.ema.decay == 0.99996
    assert r.run.amp == "bf16" and r.run.seed == 42
    assert r.teacher.name == "tresnet_v2_l.miil_in21k_ft_in1k"
    assert (r.loss.kd_weight, r.loss.temperature, r.loss.hard_label) == (5.0, 1.0, True)
    assert r.model.drop_path_rate is None


def test_overrides_are_typed_and_dotted():
    r = R.load(None, ["optim.lr=1e-3", "model.name=vit_small_patch16_224", "teacher.name=null",
                      "aug.scale=[0.5,1]", "model.kwargs={img_size: 384}"])
    assert r.optim.lr == 1e-3 and isinstance(r.optim.lr, float)
    assert r.model.name == "vit_small_patch16_224" and not r.kd
    assert r.aug.scale == [0.5, 1] and r.model.kwargs == {"img_size": 384}


def test_saved_recipe_reloads_identically(tmp_path):
    r = R.load(REPO / "recipes" / "usi.yaml", ["optim.lr=3e-3", "run.dir=runs/x"])
    r.save(tmp_path / "recipe.yaml")
    assert R.load(tmp_path / "recipe.yaml") == r


def test_run_dir_template_fills_in_the_model_name():
    assert R.load(None, ["model.name=resnet18"]).run_dir() == Path("runs/resnet18")


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1e-3"], "unknown key optim.lrr; did you mean 'lr'?"),
    (["optimm.lr=1e-3"], "unknown recipe section 'optimm'; did you mean 'optim'?"),
    (["optim.lr=fast"], "optim.lr must be float, got 'fast'"),
    (["optim.lr=-1"], "optim.lr=-1.0 is out of range: must be > 0.0"),
    (["aug.mixup_prob=1.5"], "aug.mixup_prob=1.5 is out of range"),
    (["data.batch_size=0"], "data.batch_size=0 is out of range"),
    (["data.batch_size=12.5"], "data.batch_size must be int"),
    (["ema.enabled=maybe"], "ema.enabled must be bool"),
    (["model.name=resnet5O"], "model.name='resnet5O' is not a timm model; did you mean 'resnet50'?"),
    (["teacher.name=tresnet_v2_x"], "teacher.name='tresnet_v2_x' is not a timm model"),
    (["teacher.weights=/no/such/file.pth"], "teacher.weights='/no/such/file.pth' does not exist"),
    (["run.amp=fp8"], "run.amp='fp8' is not one of bf16, fp16, none"),
    (["optim.batch_rule=linaer"], "did you mean 'linear'?"),
    (["sched.warmup_epochs=400"], "sched.warmup_epochs=400 must be less than sched.epochs=300"),
    (["aug.scale=[1, 0.5]"], "aug.scale=[1, 0.5] must be two numbers 0 < low <= high"),
    (["run.resume=/no/such.pt"], "run.resume='/no/such.pt' must be never, auto or an existing checkpoint file"),
    (["run.dir=runs/{model.nme}"], "run.dir 'runs/{model.nme}': unknown field"),
    (["lr=1e-3"], "must name a section and a key"),
    (["data.batch_size=7"], "data.batch_size=7 must be even for mixup/cutmix"),
    (["optim.name=adamww"], "optim.name='adamww' is not a timm optimizer; did you mean 'adamw'?"),
    (["optim.lr"], "must look like section.key=value"),
])
def test_bad_recipes_fail_with_one_clear_line(override, message):
    with pytest.raises(UsageError) as err:
        R.load(None, override)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_yaml_with_python_object_tags_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        R.load(path)
    assert not (tmp_path / "pwned").exists()


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UsageError, match="must be a mapping"):
        R.load(path)


def test_each_field_declares_its_facts_once_next_to_it():
    import dataclasses
    for section, cls in R.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f"{section}.{f.name} has no help text"
    free = R.resume_free_keys()
    # where the data lives and how often to log may change on resume; what is trained may not
    assert {("data", "root"), ("data", "workers"), ("run", "resume"), ("run", "log_interval")} <= free
    assert not free & {("optim", "lr"), ("model", "name"), ("data", "batch_size"), ("run", "seed")}


def test_best_metric_choices_are_the_metrics_table():
    from usi.evaluation.metrics import METRICS
    for name in METRICS:
        assert R.load(None, [f"run.best_metric={name}"]).run.best_metric == name
    with pytest.raises(UsageError, match="run.best_metric='acc' is not one of top1, top5, nll, ece, agreement, kl"):
        R.load(None, ["run.best_metric=acc"])
