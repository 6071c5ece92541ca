"""usi/recipe/loading.py: YAML that is clean (or refused in one line), dotted overrides, typed values, the
published recipe file."""
import time

import pytest
import yaml

from usi import recipe as R
from usi.errors import UsageError
from usi.runtime import files

from conftest import REPO, usi_main
from helpers import one_error, teacher_files, train, train_args


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
    # a field of two kinds (data.class_map: a file or a list) takes either, and refuses the rest in one line
    assert R.load(None, ["data.class_map=[b, a]"]).data.class_map == ["b", "a"]
    assert R.load(None, ["data.class_map=classes.txt"]).data.class_map == "classes.txt"
    with pytest.raises(UsageError, match=r"^data.class_map must be str or list or null, got \{'x': 1\}$"):
        R.load(None, ["data.class_map={x: 1}"])


def test_saved_recipe_reloads_identically(tmp_path):
    r = R.load(REPO / "recipes" / "usi.yaml", ["optim.lr=3e-3", "run.dir=runs/x"])
    r.save(tmp_path / "recipe.yaml")
    assert R.load(tmp_path / "recipe.yaml") == r


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


@pytest.mark.parametrize("override", [
    "optim.lr=inf", "optim.weight_decay=nan", "optim.clip_grad=nan", "sched.min_lr=inf", "ema.decay=nan",
    "loss.temperature=inf", "loss.kd_weight=nan", "optim.eps=.nan", "sched.warmup_lr=-inf", "aug.mixup_alpha=1e999",
    "aug.scale=[.nan, 1]", "aug.ratio=[0.75, .inf]", "model.kwargs={drop_rate: .nan}", "teacher.kwargs={x: [1, .inf]}",
    "model.drop_path_rate=-.inf",
])
def test_non_finite_numbers_are_refused_in_one_line(override):
    with pytest.raises(UsageError, match="must be a finite number") as err:
        R.load(None, [override])
    assert "\n" not in str(err.value) and override.split("=")[0].split(".")[1] in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("optim:\n  lr: 1.0e-3\n".encode("utf-16"), "is not UTF-8 text"),
    (b"optim:\n  name: adamw # r\xe9glage\n", "is not UTF-8 text"),
    (b"\x00\x01\x02garbage", "is not valid YAML"),
    (b"optim:\n  lr: 1.0e-3\noptim:\n  weight_decay: 0.1\n", "duplicate key 'optim' at line 3"),
    (b"optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "duplicate key 'lr' at line 3"),
    (b"model:\n  kwargs: {img_size: 32, img_size: 64}\n", "duplicate key 'img_size'"),
    (b"- a list\n", "must be a mapping"),
    (b"optim: [1, 2]\n", "must be a mapping"),
])
def test_recipe_files_that_are_not_clean_yaml_end_in_one_line(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        R.load(path)
    assert "\n" not in str(err.value)
    out = usi_main("train", str(path), f"run.dir={tmp_path / 'r'}")
    one_error(out, message.split(" at line")[0])


def test_a_recipe_that_is_a_directory_is_refused(tmp_path):
    one_error(usi_main("train", str(tmp_path)), "is neither a file nor a built-in recipe")


@pytest.mark.parametrize("text, message", [
    ("model:\n  kwargs: " + "[" * 100000 + "]" * 100000 + "\n", "nested too deeply"),
    ("? [a, b]\n: 1\n", "keys must be plain names"),
])
def test_yaml_a_recipe_cannot_hold_is_one_line_with_exit_2(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    one_error(usi_main("train", str(tmp_path / "r.yaml")), message)


def test_yaml_aliases_are_refused_in_recipe_files_and_in_checkpoint_metadata(image_root, tmp_path):
    """Nested aliases ("billion laughs") expand a few lines into gigabytes: a recipe has no use for them."""
    from safetensors import safe_open
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\\n' + "".join(
        f'{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\\n' for p, c in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "bomb.yaml").write_text(bomb.replace("\\n", "\n"))
    one_error(usi_main("train", str(tmp_path / "bomb.yaml")), "YAML aliases (*name) are not allowed")
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    files.export_weights(tensors, tmp_path / "bomb.safetensors", {**meta, "recipe": bomb.replace("\\n", "\n")})
    started = time.time()
    one_error(usi_main("eval", str(tmp_path / "bomb.safetensors"), f"data.root={image_root}"), "stored recipe")
    assert time.time() - started < 30


def test_a_member_with_its_defaults_spelled_out_is_the_same_ensemble(image_root, tmp_path):
    paths = teacher_files(tmp_path, ("test_resnet", "test_resnet"))
    short = ["teacher.name=test_resnet", f"teacher.weights={paths[0]}",
             f"teacher.extra=[{{name: test_resnet, weights: {paths[1]}}}]"]
    spelled = short[:2] + [f"teacher.extra=[{{kwargs: {{}}, input_size: null, fold_bn: true, name: test_resnet, "
                           f"weights: {paths[1]}}}]"]
    assert train(image_root, tmp_path / "run", *short, "run.stop_after=1").returncode == 0
    out = train(image_root, tmp_path / "run", *spelled, "run.resume=auto")
    assert out.returncode == 0, out.stderr


HUGE = "a" * 120_000


@pytest.mark.parametrize("override, tail", [
    (f"model.{HUGE}=1", "unknown key model.aaaa"),
    (f"data.workers={HUGE}", "more characters)"),
    (f"model.kwargs={HUGE}", "more characters)"),
    (f"{HUGE}=1", "more characters) must name a section and a key"),
    (f"{HUGE}.lr=1", "unknown recipe section 'aaaa"),
    (f"teacher.extra=[{HUGE}]", "more characters)"),
])
def test_a_huge_key_or_value_is_cut_to_a_readable_line(override, tail):
    out = usi_main("train", "quickstart", override, "--dry-run")
    one_error(out, tail)
    assert len(out.stderr) < 600, len(out.stderr)
