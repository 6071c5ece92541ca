"""usi/recipe/checking.py: every error the recipe alone reveals (and what a library would reject), one line,
exit 2, before any run directory."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from usi import recipe as R
from usi.errors import UsageError

from conftest import usi_main
from helpers import nan_copy, one_error, teacher_file, train, train_args


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
    (["loss.task=bcee"], "loss.task='bcee' is not one of ce, bce; did you mean 'bce'?"),
    (["loss.task=bce", "loss.bce_target_thresh=1"], "loss.bce_target_thresh=1.0 is out of range: must be >= 0.0 and "
                                                     "< 1.0"),
    (["loss.bce_target_thresh=0.2"], "loss.bce_target_thresh=0.2 applies to loss.task=bce only (loss.task=ce)"),
    (["loss.task=bce", "loss.bce_target_thresh=high"], "loss.bce_target_thresh must be float"),
    (["loss.distill_token=sofft"], "loss.distill_token='sofft' is not one of soft, hard; did you mean 'soft'?"),
    (["loss.distill_token=soft", "teacher.name=null"], "loss.distill_token=soft needs a teacher (teacher.name is "
                                                        "null)"),
    (["loss.distill_token=hard", "loss.hard_label=false"], "loss.hard_label=false would leave it untrained"),
    (["data.minival=-0.1"], "data.minival=-0.1 is out of range: must be >= 0.0"),
    (["aug.randaugment_fill=[1, 2, 3]", "aug.auto_augment=null"], "aug.auto_augment is null (no RandAugment)"),
    (["data.minival=1.5"], "data.minival=1.5 must be a fraction below 1 or a whole number of images"),
    (["data.format=shards", "data.minival=0.1"], "data.minival needs data.format=folder"),
    (["run.keep_best=0"], "run.keep_best=0 is out of range: must be >= 1 and <= 100"),
    (["run.wandb_project=lab/kd"], "run.wandb_project='lab/kd' must be 1 to 128 characters, none of"),
    (["run.wandb_project=''"], "run.wandb_project='' must be 1 to 128 characters"),
    (["run.wandb_tags=[kd, '']"], "run.wandb_tags: '' is not a tag of 1 to 64 characters"),
    (["run.wandb_tags=[3]"], "run.wandb_tags: 3 is not a tag"),
    (["run.wandb_tags=kd"], "run.wandb_tags must be list"),
    (["run.wandb_name=[a]"], "run.wandb_name must be str or null"),
    (["optim.momentum=0.9"], "optim.momentum: adamw (AdamW) takes no momentum; its arguments: lr, betas, eps"),
    (["optim.name=sgd", "optim.betas=[0.9, 0.99]"], "optim.betas: sgd (SGD) takes no betas"),
    (["optim.name=sgd", "optim.kwargs={nesterv: false}"], "optim.kwargs.nesterv is not an argument of sgd (SGD) or of "
     "timm's create_optimizer_v2; valid: dampening, nesterov, maximize, foreach, differentiable, fused, "
     "filter_bias_and_bn, fallback_list, fallback_no_weight_decay, layer_decay_min_scale, layer_decay_no_opt_scale; "
     "did you mean 'nesterov'?"),
    (["optim.kwargs={lr: 1}"], "optim.kwargs sets lr, which usi sets from optim.lr; set that instead"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be 2 numbers in [0, 1) for adamw (its default: [0.9, 0.999])"),
    (["optim.name=adan", "optim.betas=[0.9, 0.99]"], "must be 3 numbers in [0, 1) for adan"),
    (["optim.name=sgd", "optim.momentum=1.5"], "optim.momentum=1.5 is out of range: must be >= 0.0 and < 1.0"),
    (["model.grad_checkpointing=maybe"], "model.grad_checkpointing must be bool"),
    (["run.sync_bn=yes please"], "run.sync_bn must be bool"),
    (["data.class_map={a: 1}"], "data.class_map must be str or list or null, got {'a': 1}"),
    (["data.format=shards", "data.class_map=[a]"], "data.class_map works on image folders (data.format=folder)"),
])
def test_bad_recipes_fail_with_one_clear_line(override, message):
    with pytest.raises(UsageError) as err:
        R.load(None, override)
    text = str(err.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("args, message", [
    (["sched.name=plateau"], "sched.name='plateau' is not one of"),
    (["sched.name=wsd"], "sched.name='wsd' is not one of"),
    (["aug.auto_augment=bogus"], "aug.auto_augment='bogus' is not a timm augmentation string"),
    (["aug.auto_augment=rand-m9-zz3"], "aug.auto_augment='rand-m9-zz3'"),
    (["run.seed=-1"], "run.seed=-1 is out of range"),
    (["model.drop_path_rate=2.0"], "model.drop_path_rate=2.0 is out of range: must be >= 0.0 and < 1.0"),
    (["model.kwargs={drop_rate: 2}"], "with model.kwargs {'drop_rate': 2} fails on 16 px inputs (data.input_size): "
                                      "dropout probability has to be between 0 and 1"),
    (["model.kwargs={depth: oops}", "model.name=test_vit"], "do not fit test_vit"),
    (["model.name=test_resnet.no_such_tag"], "test_resnet has no pretrained tag 'no_such_tag'"),
    (["model.name=test_vit", "data.input_size=33"], "model.name=test_vit fails on 33 px inputs"),
    (["teacher.name=test_resnet", "teacher.kwargs={foo: 1}"], "teacher.kwargs {'foo': 1} do not fit test_resnet"),
    (["teacher.name=test_vit", "teacher.input_size=33"], "teacher test_vit cannot take 33 px inputs"),
    (["run.device=cuda"], "run.device=cuda but torch sees no CUDA GPU"),
    (["run.dir=r/{"], "is not a valid template"),
    (["run.dir=r/{model.nme}"], "unknown field"),
    (["optim.name=adamww"], "optim.name='adamww' is not a timm optimizer; did you mean 'adamw'?"),
    (["aug.interpolation=fancy"], "aug.interpolation='fancy' is not one of"),
    (["run.best_metric=agreement"], "run.best_metric=agreement needs a teacher"),
    (["run.best_metric=kl"], "run.best_metric=kl needs a teacher"),
    (["model.name=dla46_c", "model.grad_checkpointing=true"],
     "model.grad_checkpointing=true: dla46_c does not support gradient checkpointing in timm"),
])
def test_values_a_library_rejects_end_in_one_line_before_any_run_directory(image_root, tmp_path, args, message):
    extra = []
    if args[0] == "teacher.name=test_resnet":
        extra = [f"teacher.weights={teacher_file(tmp_path / 't.safetensors')}"]
    elif args[0] == "teacher.name=test_vit":
        save_file(timm.create_model("test_vit", num_classes=4, img_size=32).state_dict(), str(tmp_path / "v.st"))
        extra = [f"teacher.weights={tmp_path / 'v.st'}", "teacher.kwargs={img_size: 32}"]
    out = usi_main(*train_args(image_root, tmp_path / "r", *args, *extra))
    one_error(out, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["model.kwargs={{features_only: true}}"], "does not give class logits (batch x 4): it returns list"),
    (["model.kwargs={{act_layer: nosuch}}"], "do not fit test_resnet: KeyError: 'nosuch'"),
    (["teacher.name=test_resnet", "teacher.kwargs={{act_layer: nosuch}}", "teacher.weights={teacher}"],
     "teacher.kwargs {'act_layer': 'nosuch'} do not fit test_resnet"),
    (["run.ece_bins=100000000000000000000"], "run.ece_bins"),
    (["data.input_size=100000000000000000000"], "data.input_size"),
    (["teacher.name=test_resnet", "teacher.input_size=100000000000000000000"], "teacher.input_size"),
    (["loss.temperature=1e-30"], "loss.temperature"),
    (["aug.scale=[true, true]"], "aug.scale"),
    (["run.dir={tmp}/r/{{model.name:>300}}"], "fields are plain {section.key}"),
    (["run.dir={tmp}/r/{{model.name!r}}"], "fields are plain {section.key}"),
    (["run.dir={tmp}/" + "x" * 300], "255 per name"),
    (["run.dir=/proc/usi_test_x"], "cannot be created"),
    (["run.dir={tmp}/afile"], "is a file, not a directory"),
    (["data.format=shards", "data.train_shards={tmp}/s-{{000000..000003.tar"], "a brace pattern is like"),
    (["teacher.name=test_resnet", "teacher.weights={nan_teacher}"], "non-finite (NaN or infinite) weights"),
    (["teacher.name=test_resnet", "teacher.weights={int_keys}"], "holds no weights"),
    (["model.weights={int_keys}"], "holds no weights"),
])
def test_more_values_that_a_library_rejects_are_one_line_before_any_run_directory(image_root, tmp_path, args,
                                                                                   message):
    teacher = teacher_file(tmp_path / "teacher.safetensors")
    save_file(nan_copy(timm.create_model("test_resnet", num_classes=4).state_dict()), str(tmp_path / "nan.safetensors"))
    torch.save({1: torch.zeros(1)}, tmp_path / "int_keys.pth")
    (tmp_path / "afile").write_text("x")
    shards = tmp_path / "sh"
    if any("data.format=shards" in a for a in args):
        from usi.data.shard_writer import main as make_shards
        assert make_shards([str(image_root / "train"), str(shards / "train"), "--shard-size", "16"]) == 0
        assert make_shards([str(image_root / "val"), str(shards / "val"), "--classes-from",
                            str(image_root / "train")]) == 0
    names = {"teacher": teacher, "tmp": tmp_path, "nan_teacher": tmp_path / "nan.safetensors",
             "int_keys": tmp_path / "int_keys.pth"}
    root = shards if (shards / "train").is_dir() else image_root
    out = usi_main(*train_args(root, tmp_path / "r", *[a.format(**names) for a in args]))
    one_error(out, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, message", [
    (["teacher.extra=[resnet50]"], "teacher.extra[0] must be a mapping"),
    (["teacher.extra=[{name: test_resnet, wieghts: x}]"],
     "unknown key teacher.extra[0].wieghts; did you mean 'weights'"),
    (["teacher.extra=[{weights: x}]"], "teacher.extra[0] needs a name"),
    (["teacher.extra=[{name:test_vit}]"], "YAML needs a space after each colon"),
    (["teacher.extra=[{name: resnet5O}]"], "teacher.extra[0].name='resnet5O' is not a timm model; did you mean"),
    (["teacher.extra=[{name: test_resnet, weights: /nonexistent.pth}]"], "teacher.extra[0].weights="),
    (["teacher.extra=[{name: test_resnet, input_size: 2}]"], "teacher.extra[0].input_size=2 is out of range"),
    (["teacher.extra=[{name: test_resnet, fold_bn: maybe}]"], "teacher.extra[0].fold_bn must be bool"),
    (["teacher.name=null", "teacher.extra=[{name: test_resnet}]"], "teacher.name is null"),
    (["teacher.combine=median"], "teacher.combine='median' is not one of probs, logits"),
    (["features.student=layer3"], "features.student is set but features.teacher is not"),
    (["teacher.name=null", "features.student=layer3", "features.teacher=layer3"], "needs a teacher"),
    (["features.loss=l1", "features.student=a", "features.teacher=b"], "features.loss='l1' is not one of mse"),
])
def test_bad_ensemble_and_feature_settings_are_one_line(image_root, tmp_path, extra, message):
    out = train(image_root, tmp_path / "run", "teacher.name=test_resnet", *extra)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


HUGE = "a" * 120_000  # a value pasted by mistake (a file's content, a runaway template)


@pytest.mark.parametrize("override, tail", [
    (f"model.name={HUGE}", "... (119922 more characters) is not a timm model"),
    (f"teacher.name={HUGE}", "more characters) is not a timm model"),
    (f"optim.name={HUGE}", "more characters) is not a timm optimizer"),
    (f"sched.name={HUGE}", "more characters) is not one of cosine, step"),
    (f"aug.auto_augment={HUGE}", "more characters) is not a timm augmentation string"),
    (f"aug.scale=[1, {HUGE}]", "more characters) must be two numbers"),
    (f"run.loggers=[{HUGE}]", "more characters) is not one of tensorboard, wandb"),
    (f"run.resume={HUGE}", "more characters) must be never, auto or an existing checkpoint file"),  # was exit 1
    (f"model.weights={HUGE}", "more characters) cannot be read (File name too long)"),  # was a traceback
    (f"data.root={HUGE}", "more characters) does not exist (expected the folders train/ and val/ in it)"),
    (f"run.dir={HUGE}", "a folder name of 120000 bytes"),
])
def test_a_huge_value_is_cut_and_the_message_around_it_kept(image_root, override, tail):
    """The value is quoted to a readable length; what is wrong with it, and what to do, still follow."""
    out = usi_main(*train_args(image_root, "runs/x"), override, "--dry-run")
    one_error(out, tail)
    assert len(out.stderr) < 600, len(out.stderr)
