"""Bad input, by class: every member ends in one line (exit 2), writes nothing, runs nothing it should not,
and loses nothing already written. Members beyond the ones a report listed are tried on purpose."""
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from conftest import REPO, TINY, read_jsonl, usi_main
from PIL import Image
from safetensors.torch import save_file

from usi import recipe as R
from usi.data.folder import FolderSplit, load_rgb
from usi.errors import UsageError
from usi.runtime import files
from usi.training import checkpoint


def train_args(root, run_dir, *extra):
    return ["train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra]


def one_error(out, message):
    """Exit 2, exactly one `usi: error:` line containing `message`, no traceback."""
    lines = [x for x in out.stderr.splitlines() if x.startswith("usi: error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def strict_json(text: str):
    """Python's json accepts bare NaN; real JSON does not."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def nan_copy(state: dict) -> dict:
    """The weights of a diverged run: every floating-point tensor NaN."""
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}


def teacher_file(path, classes=4, name="test_resnet"):
    save_file(timm.create_model(name, num_classes=classes).state_dict(), str(path))
    return path


# ---------------------------------------------------------------- 1. a checkpoint never runs commands or opens files


def test_eval_never_runs_commands_or_opens_files_named_in_a_checkpoint(image_root, tmp_path):
    pwned = tmp_path / "pwned"
    subprocess.run([sys.executable, "-m", "usi", "shards", str(image_root / "val"), str(tmp_path / "shards" / "val"),
                    "--classes-from", str(image_root / "train"), "--shard-size", "4"], cwd=REPO, check=True,
                   capture_output=True)
    trained = usi_main(*train_args(image_root, tmp_path / "run", "sched.epochs=1", "sched.warmup_epochs=0"))
    assert trained.returncode == 0
    hostile = R.load(tmp_path / "run" / "recipe.yaml", [
        "data.format=shards",
        f"data.val_shards=pipe:touch {pwned}; cat {tmp_path}/shards/val/shard-{{000000..000002}}.tar",
        "teacher.name=test_resnet", f"teacher.weights={tmp_path / 'run' / 'last.pt'}"])
    state = files.load_state_file(tmp_path / "run" / "best.safetensors")
    meta = files.read_metadata(tmp_path / "run" / "best.safetensors")
    files.export_weights(state, tmp_path / "evil.safetensors", {**meta, "recipe": hostile.to_yaml()})
    full = checkpoint.load(tmp_path / "run" / "last.pt")
    checkpoint.save({**{k: v for k, v in full.items() if k != "format"}, "recipe": hostile.to_yaml()},
                    tmp_path / "evil.pt")
    for ckpt in ("evil.safetensors", "evil.pt"):
        out = usi_main("eval", str(tmp_path / ckpt), f"data.root={tmp_path / 'shards'}", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        report = strict_json(out.stdout)
        assert report["images"] == 12 and "teacher" not in report  # the index's own shards; no teacher file opened
        assert "teacher not evaluated" in out.stderr
        assert not pwned.exists()
    one_error(usi_main("eval", str(tmp_path / "evil.pt")), "usi eval needs data.root=")


# ---------------------------------------------------------------- 2. numbers that cannot be right


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


def test_a_run_whose_every_update_is_skipped_does_not_exit_0(image_root, tmp_path):
    out = usi_main(*train_args(image_root, tmp_path / "r", "optim.lr=1e30", "run.max_nonfinite=1000", "sched.epochs=3",
                              "sched.warmup_epochs=0", "ema.enabled=false"))
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("usi: stopped")]
    assert "every one of the 8 updates of epoch" in line and "skipped as non-finite" in line
    assert not (tmp_path / "r" / "summary.json").exists()


# ---------------------------------------------------------------- 3. values a library would reject with a traceback


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


# ---------------------------------------------------------------- 5. files that are not what they seem


@pytest.fixture()
def odd_files(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not weights\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    fake_zip = tmp_path / "fake.pt"
    shutil.make_archive(str(tmp_path / "fake"), "zip", str(tmp_path), "notes.pth")
    (tmp_path / "fake.zip").rename(fake_zip)
    half = tmp_path / "half.safetensors"
    teacher_file(tmp_path / "whole.safetensors")
    half.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:300])
    return {"text": text, "empty": empty, "zip": fake_zip, "half": half}


@pytest.mark.parametrize("kind", ["text", "empty", "zip", "half"])
@pytest.mark.parametrize("use", ["teacher.weights", "run.resume", "usi eval"])
def test_files_that_are_not_checkpoints_end_in_one_line(image_root, tmp_path, odd_files, kind, use):
    path = odd_files[kind]
    if use == "usi eval":
        out = usi_main("eval", str(path), f"data.root={image_root}")
    else:
        extra = ["teacher.name=test_resnet"] if use == "teacher.weights" else []
        out = usi_main(*train_args(image_root, tmp_path / "r", *extra, f"{use}={path}"))
    one_error(out, str(path))
    assert not (tmp_path / "r").exists()


def test_a_safetensors_file_named_pth_loads_and_mismatches_say_what_differs(image_root, tmp_path):
    teacher = teacher_file(tmp_path / "teacher.pth")  # safetensors bytes, .pth name
    out = usi_main(*train_args(image_root, tmp_path / "ok", "teacher.name=test_resnet", f"teacher.weights={teacher}",
                              "sched.epochs=1", "sched.warmup_epochs=0", "run.max_steps=1"))
    assert out.returncode == 0, out.stderr[-2000:]
    other = teacher_file(tmp_path / "other.safetensors", name="test_efficientnet")
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={other}"))
    one_error(out, "do not fit test_resnet: ")
    line = next(x for x in out.stderr.splitlines() if x.startswith("usi: error"))
    assert "missing: " in line or "unexpected: " in line or "shapes differ" in line
    # a student checkpoint evaluated as another architecture
    out = usi_main("eval", str(tmp_path / "ok" / "best.safetensors"), f"data.root={image_root}",
                   "model.name=test_efficientnet")
    one_error(out, "does not fit test_efficientnet: ")
    assert "missing: " in out.stderr


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


def test_a_cache_path_that_is_a_file_costs_a_warning_not_the_run(image_root, tmp_path):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    teacher = teacher_file(tmp_path / "t.safetensors")
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={teacher}",
                               "sched.epochs=1", "sched.warmup_epochs=0"), env={"USI_CACHE": str(blocker)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert len([x for x in out.stderr.splitlines() if "teacher logits not cached" in x]) == 1


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_quickstart_out_that_cannot_be_a_folder_is_refused(tmp_path, where):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    out = usi_main("quickstart", "--out", str(blocker if where == "a file" else blocker / "sub"))
    one_error(out, "--out")


@pytest.mark.parametrize("index", ['{"classes": ["a"], "shards": [{"name": "s.tar", "cou', "[]", "{}",
                                   '{"classes": ["a"], "shards": [{"name": "s.tar", "count": -3}]}',
                                   '{"classes": [], "shards": []}', "\xff\xfe"])
def test_a_corrupt_shard_index_ends_in_one_line(image_root, tmp_path, index):
    for split in ("train", "val"):
        (tmp_path / "shards" / split).mkdir(parents=True)
        (tmp_path / "shards" / split / "index.json").write_text(index, encoding="latin-1")
    out = usi_main(*train_args(tmp_path / "shards", tmp_path / "r", "data.format=shards"))
    one_error(out, "is not a usi shard index")


def test_all_unreadable_images_with_loader_workers_end_in_one_line(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        (tmp_path / "data" / "val" / cls).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "data" / "train" / cls / f"{i}.jpg").write_bytes(b"not a jpeg")
        (tmp_path / "data" / "val" / cls / "0.jpg").write_bytes(b"")
    out = usi_main(*train_args(tmp_path / "data", tmp_path / "r", "data.workers=2"))
    one_error(out, "no readable image in")


@pytest.mark.parametrize("args, message", [
    (["{missing}", "{out}"], "does not exist"),
    (["{train}", "{out}", "--shard-size", "0"], "must be at least 1"),
    (["{train}", "{out}", "--shard-size", "-5"], "must be at least 1"),
    (["{train}", "{out}", "--workers", "0"], "must be at least 1"),
    (["{zebra}", "{out}", "--classes-from", "{train}"], "class folder 'zebra' that the training split does not have"),
    (["{train}", "{out}", "--prefix", "../../evil"], "must be a plain file name"),
    (["{train}", "{out}", "--prefix", "a/b"], "must be a plain file name"),
    (["{root}", "{out}"], "holds the splits train, val, not class folders"),
    (["{train}", "{afile}"], "cannot be created or written"),
    (["{train}", "{afile}/x"], "cannot be created or written"),
    (["{train}", "{foreign}"], "already holds files this tool did not write (notes.txt)"),
])
def test_make_shards_bad_arguments_end_in_one_line(image_root, tmp_path, args, message):
    zebra = tmp_path / "zebra-val"
    shutil.copytree(image_root / "val", zebra)
    (zebra / "circle").rename(zebra / "zebra")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    names = {"missing": tmp_path / "nope", "out": tmp_path / "out", "train": image_root / "train", "zebra": zebra,
             "root": image_root, "afile": tmp_path / "afile", "foreign": tmp_path / "foreign"}
    out = subprocess.run([sys.executable, "-m", "usi", "shards", *[a.format(**names) for a in args]], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(("usi: error:", "usi shards: error:"))
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True
    assert not list(tmp_path.parent.glob("evil*")) and (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out" / "index.json").exists()


# ---------------------------------------------------------------- 7. images whose bits a plain convert destroys


@pytest.mark.parametrize("mode, values, scale", [
    ("I;16", np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16), 255 / 65535),
    ("I", np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.int32), 255 / 65535),
    ("I", np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.int32), 1.0),  # 8-bit values in 32 bits
    ("F", np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(np.float32), 255.0),
    ("F", np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.float32), 1.0),
])
def test_16_bit_and_float_images_keep_their_range(tmp_path, mode, values, scale):
    img = Image.fromarray(values)  # the dtype gives the mode
    assert img.mode == mode
    path = tmp_path / "img.tif"
    img.save(path)
    rgb = np.asarray(load_rgb(str(path))).astype(np.float64)
    expected = np.clip(values.astype(np.float64) * scale, 0, 255)
    assert rgb.shape == (64, 64, 3) and np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb == 255).mean() < 0.02  # a plain convert("RGB") made 99.6% of a 16-bit gradient white


def test_a_16_bit_png_reads_as_its_gradient(tmp_path):
    values = (np.arange(256, dtype=np.uint16) * 257)[None].repeat(8, 0)
    Image.fromarray(values).save(tmp_path / "g.png")
    rgb = np.asarray(load_rgb(str(tmp_path / "g.png")))
    assert np.abs(rgb[0, :, 0].astype(int) - np.arange(256)).max() <= 1


# ---------------------------------------------------------------- 8. every val image counted once


def test_an_unreadable_val_image_is_left_out_and_reported_never_duplicated(image_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    sorted((data / "val").rglob("*.jpg"))[4].write_bytes(b"broken")
    out = usi_main(*train_args(data, tmp_path / "r", "sched.epochs=1", "sched.warmup_epochs=0", "data.workers=1"))
    assert out.returncode == 0, out.stderr[-2000:]
    (record,) = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert record["raw"]["count"] == record["ema"]["count"] == 11
    assert record["val_bad_images"] == 1 and record["train"]["bad_images"] == 0  # this epoch's evaluation met it
    report = strict_json(usi_main("eval", str(tmp_path / "r" / "last.pt"), f"data.root={data}", "--json").stdout)
    assert report["images"] == 11 and report["unreadable"] == 1
    assert all(m["count"] == 11 for m in report["students"].values())
    split = FolderSplit(data / "val", classes=FolderSplit(data / "train").classes)
    assert len(split) == 12  # the file is still listed: reported as unreadable, not silently dropped


# ---------------------------------------------------------------- 9. shards written from what they say


def make_shards(src, out, *extra):
    return subprocess.run([sys.executable, "-m", "usi", "shards", str(src), str(out), "--workers", "1", *extra],
                          cwd=REPO, capture_output=True, text=True)


def test_make_shards_writes_what_training_reads_and_refuses_to_mix(image_root, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(image_root / "train", src)
    for i, path in enumerate(sorted(src.rglob("*.jpg"))[:6]):  # TIFF and PPM samples among the JPEGs
        with Image.open(path) as img:
            img.save(path.with_suffix(".tif" if i % 2 else ".ppm"))
        path.unlink()
    out = tmp_path / "shards"
    assert make_shards(src, out / "train", "--shard-size", "8").returncode == 0
    assert make_shards(image_root / "val", out / "val", "--classes-from", str(src), "--shard-size", "4").returncode == 0
    run = usi_main(*train_args(out, tmp_path / "r", "data.format=shards", "sched.epochs=1", "sched.warmup_epochs=0"))
    assert run.returncode == 0 and "skipped a corrupt sample" not in run.stderr, run.stderr[-2000:]
    index = (out / "train" / "index.json").read_text()
    # another shard size, another source, val into train's folder: refused, the shards and index untouched
    for args in (["--shard-size", "5"], ):
        again = make_shards(src, out / "train", *args)
        assert again.returncode == 2 and "already holds shards written with other shard_size" in again.stderr
    val_into_train = make_shards(image_root / "val", out / "train", "--classes-from", str(src), "--shard-size", "8")
    assert val_into_train.returncode == 2 and "other source" in val_into_train.stderr
    assert (out / "train" / "index.json").read_text() == index
    # a killed writer's leftovers go away on the next (identical) run
    stale = out / "train" / ".shard-000001.tar.tmp-99999"
    stale.write_bytes(b"half")
    assert make_shards(src, out / "train", "--shard-size", "8").returncode == 0
    assert not stale.exists() and (out / "train" / "index.json").read_text() == index
    assert not list((out / "train").glob(".*tmp*"))


# ---------------------------------------------------------------- 10-14. work that must not be lost or mixed


def test_an_explicit_resume_into_another_finished_run_is_refused_and_changes_nothing(image_root, tmp_path):
    assert usi_main(*train_args(image_root, tmp_path / "A", "run.stop_after=1")).returncode == 0
    assert usi_main(*train_args(image_root, tmp_path / "B", "optim.lr=0.01")).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "B").iterdir()}
    out = usi_main(*train_args(image_root, tmp_path / "B", "optim.lr=0.01", f"run.resume={tmp_path / 'A' / 'last.pt'}"))
    one_error(out, "cannot resume from")  # A's checkpoint holds another recipe (lr 0.002)
    out = usi_main(*train_args(image_root, tmp_path / "B", f"run.resume={tmp_path / 'A' / 'last.pt'}"))
    one_error(out, f"cannot resume {tmp_path / 'B'}: optim.lr was 0.01, now 0.002")
    assert {p.name: p.read_bytes() for p in (tmp_path / "B").iterdir()} == before
    out = usi_main(*train_args(image_root, tmp_path / "C", "optim.lr=0.01", f"run.resume={tmp_path / 'A' / 'last.pt'}"))
    one_error(out, "cannot resume from")
    assert not (tmp_path / "C").exists()


def test_resuming_on_data_whose_class_names_differ_is_refused(image_root, tmp_path):
    assert usi_main(*train_args(image_root, tmp_path / "r", "run.stop_after=1")).returncode == 0
    renamed = tmp_path / "renamed"
    shutil.copytree(image_root, renamed)
    for split in ("train", "val"):
        (renamed / split / "circle").rename(renamed / split / "zcircle")  # same count, labels shift
    out = usi_main(*train_args(renamed, tmp_path / "r", "run.resume=auto"))
    one_error(out, "they differ at label 0 ('circle' vs 'frame')")


@pytest.mark.parametrize("target", ["last.pt", "best.safetensors"])
def test_a_checkpoint_with_damaged_bytes_is_refused(image_root, tmp_path, target):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0
    data = bytearray((run / target).read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF  # one flipped byte inside the tensors
    (run / target).write_bytes(bytes(data))
    if target == "last.pt":
        one_error(usi_main(*train_args(image_root, run, "run.resume=auto")), "is damaged")
    else:
        one_error(usi_main("eval", str(run / target), f"data.root={image_root}"), "is damaged")


def test_a_run_directory_moved_or_spelled_otherwise_resumes(image_root, tmp_path, monkeypatch):
    assert usi_main(*train_args(image_root, tmp_path / "r", "run.stop_after=1")).returncode == 0
    shutil.copytree(tmp_path / "r", tmp_path / "copy")
    moved = usi_main(*train_args(image_root, tmp_path / "copy", "run.resume=auto", "run.stop_after=1"))
    assert moved.returncode == 0, moved.stderr  # its recipe.yaml names run.dir r: that may differ
    assert [r["epoch"] for r in read_jsonl(tmp_path / "copy" / "metrics.jsonl")] == [1, 2]
    monkeypatch.chdir(tmp_path)
    elsewhere = usi_main(*train_args(image_root, "r/", f"run.resume={tmp_path / 'r' / 'last.pt'}"))
    assert elsewhere.returncode == 0, elsewhere.stderr  # the same directory, spelled relative with a slash
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [1, 2]


def test_leftovers_of_a_killed_write_are_removed_and_weights_are_readable_by_others(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0
    for name in (".last.pt.tmp-99999", ".tmpAbC123"):  # atomic_write's, and safetensors' own
        (run / name).write_bytes(b"half a checkpoint")
    assert usi_main(*train_args(image_root, run, "run.resume=auto")).returncode == 0
    assert not (run / ".last.pt.tmp-99999").exists() and not (run / ".tmpAbC123").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("best.safetensors", "last.pt", "summary.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("damage", ["", '{"best": {"val'])
def test_an_empty_or_torn_summary_of_a_finished_run_is_rebuilt(image_root, tmp_path, damage):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run)).returncode == 0
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(damage)
    again = usi_main(*train_args(image_root, run, "run.resume=auto"))
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr
    assert json.loads((run / "summary.json").read_text())["best"] == summary["best"]


def test_a_torn_metrics_line_or_a_lost_summary_loses_nothing(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train": {"task_lo')  # a crash (or a full disk) in the middle of an append
    assert usi_main(*train_args(image_root, run, "run.resume=auto")).returncode == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()  # lost after the final checkpoint
    again = usi_main(*train_args(image_root, run, "run.resume=auto"))
    assert again.returncode == 0 and "already finished" in again.stderr
    restored = json.loads((run / "summary.json").read_text())
    for key in ("best", "final", "epochs", "num_classes", "params"):
        assert restored[key] == summary[key], key


def test_two_runs_started_into_one_directory_never_mix(image_root, tmp_path):
    run = tmp_path / "r"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    slow = ["sched.epochs=3", "data.input_size=48", "data.batch_size=2", "optim.global_batch=2"]
    first = subprocess.Popen([sys.executable, "-m", "usi", *train_args(image_root, run, *slow)], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / ".lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    for resume in ("never", "auto"):
        second = usi_main(*train_args(image_root, run, *slow, f"run.resume={resume}"))
        one_error(second, "is in use by usi pid")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert not (run / ".lock").exists()


def test_eval_json_and_run_files_are_valid_json_for_diverged_weights(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    state = checkpoint.load(run / "last.pt")
    state["student"] = nan_copy(state["student"])
    checkpoint.save({k: v for k, v in state.items() if k != "format"}, tmp_path / "nan.pt")
    out = usi_main("eval", str(tmp_path / "nan.pt"), f"data.root={image_root}", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    report = strict_json(out.stdout)
    assert report["students"]["raw"]["nll"] is None  # NaN is written as null
    for name in ("metrics.jsonl", "summary.json"):
        for line in (run / name).read_text().splitlines() if name.endswith("l") else [(run / name).read_text()]:
            strict_json(line)


# ---------------------------------------------------------------- a second hostile run: more members of each class


def test_a_folder_that_is_no_run_is_never_written_into(image_root, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("precious\n")
    (mine / "summary.json").write_text('{"mine": 1}')
    for resume in ("auto", "never"):
        out = usi_main(*train_args(image_root, mine, f"run.resume={resume}"))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (mine / "metrics.jsonl").read_text() == "precious\n" and sorted(p.name for p in mine.iterdir()) == [
        "metrics.jsonl", "summary.json"]


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


def test_a_failed_start_removes_every_folder_it_made(image_root, tmp_path):
    out = usi_main(*train_args("/no/such/data", tmp_path / "a" / "b" / "c"))
    one_error(out, "does not exist")
    assert not (tmp_path / "a").exists()


def test_an_unforeseen_error_is_still_one_line_and_its_traceback_is_kept(image_root, tmp_path, monkeypatch):
    import usi.training.build

    def broken(*args, **kwargs):
        raise ZeroDivisionError("something nobody checked for")

    monkeypatch.setattr(usi.training.build, "build_training", broken)
    out = usi_main(*train_args(image_root, tmp_path / "r"))
    lines = [x for x in out.stderr.splitlines() if x.startswith("usi: error:")]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "ZeroDivisionError: something nobody checked for (in test_bad_input.py:" in lines[0]
    assert "USI_TRACEBACK=1" in lines[0] and not (tmp_path / "r").exists()


def test_weights_of_a_diverged_run_are_measured_as_wrong_and_not_exported(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    state = checkpoint.load(run / "last.pt")
    state["student"] = nan_copy(state["student"])
    state["ema"] = {}
    checkpoint.save({k: v for k, v in state.items() if k != "format"}, tmp_path / "nan.pt")
    teacher = teacher_file(tmp_path / "teacher.safetensors")
    out = usi_main("eval", str(tmp_path / "nan.pt"), f"data.root={image_root}", "teacher.name=test_resnet",
                   f"teacher.weights={teacher}", "--json")
    assert out.returncode == 0 and "NaN or infinite logits for 12 of 12" in out.stderr, out.stderr
    raw = strict_json(out.stdout)["students"]["raw"]
    assert raw["top1"] == 0 and raw["top5"] == 0 and raw["agreement"] == 0 and raw["nonfinite"] == 12
    one_error(usi_main("export", str(tmp_path / "nan.pt"), str(tmp_path / "out")), "a diverged run")
    assert not (tmp_path / "out").exists()


def test_damaged_checkpoint_metadata_and_misfit_exports_are_one_line(image_root, tmp_path):
    from safetensors import safe_open
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for change, message in (({"recipe": "{{{"}, "stored recipe is not a usi recipe"),
                            ({"recipe": "- a"}, "stored recipe is not a usi recipe"),
                            ({"classes": "not json"}, "stored class list"), ({"classes": "5"}, "stored class list")):
        path = tmp_path / "edited.safetensors"
        files.export_weights(tensors, path, {**meta, **change})
        one_error(usi_main("eval", str(path), f"data.root={image_root}"), message)
        one_error(usi_main("export", str(path), str(tmp_path / "out")), message)
    other = tmp_path / "other.safetensors"
    files.export_weights(tensors, other, {**meta, "model": "test_efficientnet",
                                               "recipe": meta["recipe"].replace("test_resnet", "test_efficientnet")})
    one_error(usi_main("export", str(other), str(tmp_path / "out")), "does not fit test_efficientnet")
    (tmp_path / "afile").write_text("x")
    one_error(usi_main("export", str(run / "best.safetensors"), str(tmp_path / "afile" / "out")), "cannot be created")
    state = torch.load(run / "last.pt", weights_only=True)
    for change in ({"recipe": "{{{"}, {"recipe": "- a"}, {"classes": 5}):
        checkpoint.save({**{k: v for k, v in state.items() if k != "format"}, **change}, tmp_path / "edited.pt")
        one_error(usi_main(*train_args(image_root, tmp_path / "r2", f"run.resume={tmp_path / 'edited.pt'}")),
                  "damaged usi checkpoint")
        assert not (tmp_path / "r2").exists()


def test_truncated_or_missing_val_shards_are_counted_by_what_they_lack(image_root, tmp_path):
    from usi.data.shard_writer import main as make_shards
    shards = tmp_path / "sh"
    assert make_shards([str(image_root / "train"), str(shards / "train"), "--shard-size", "16"]) == 0
    assert make_shards([str(image_root / "val"), str(shards / "val"), "--classes-from", str(image_root / "train"),
                        "--shard-size", "4"]) == 0
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    cut = shards / "val" / "shard-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    (shards / "val" / "shard-000002.tar").unlink()
    out = usi_main("eval", str(run / "best.safetensors"), "data.format=shards", f"data.root={shards}", "--json")
    assert out.returncode == 0, out.stderr
    report = strict_json(out.stdout)
    assert report["images"] + report["unreadable"] == 12 and report["unreadable"] >= 5  # every one accounted for


def test_eval_and_resume_never_need_the_starting_weights_file(image_root, tmp_path):
    init = teacher_file(tmp_path / "init.safetensors")
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, f"model.weights={init}", "run.stop_after=1")).returncode == 0
    init.unlink()  # moved away after the start
    assert usi_main("eval", str(run / "best.safetensors"), f"data.root={image_root}").returncode == 0
    again = usi_main(*train_args(image_root, run, "model.weights=null", "run.resume=auto"))
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_val_data_that_is_all_unreadable_ends_in_one_line(image_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    for path in (data / "val").rglob("*.jpg"):
        path.write_bytes(b"not an image")
    one_error(usi_main(*train_args(data, tmp_path / "r")), "no val image could be read (12 unreadable")


def test_quickstart_out_in_a_place_that_takes_no_files_is_one_line(tmp_path):
    one_error(usi_main("quickstart", "--out", "/proc/usi_quickstart_test"), "/proc/usi_quickstart_test")


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


def test_odd_links_and_pixels_in_data_folders_are_refused_or_counted(image_root, tmp_path):
    loop = tmp_path / "loop"
    shutil.copytree(image_root, loop)
    (loop / "train" / "zzloop").symlink_to(loop / "train")  # a class folder that is its own split
    one_error(usi_main(*train_args(loop, tmp_path / "r")), "links back to")
    odd = tmp_path / "odd"
    shutil.copytree(image_root, odd)
    (odd / "val" / "circle" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    Image.fromarray(np.full((20, 20), np.nan, np.float32)).save(odd / "val" / "circle" / "nan.tiff")
    out = usi_main(*train_args(odd, tmp_path / "r2", "sched.epochs=1", "sched.warmup_epochs=0"))
    assert out.returncode == 0, out.stderr
    (record,) = read_jsonl(tmp_path / "r2" / "metrics.jsonl")
    assert record["raw"]["count"] == 12 and record["val_bad_images"] == 2  # both listed, both unreadable
    assert "RuntimeWarning" not in out.stderr


@pytest.mark.parametrize("text, message", [
    ("model:\n  kwargs: " + "[" * 100000 + "]" * 100000 + "\n", "nested too deeply"),
    ("? [a, b]\n: 1\n", "keys must be plain names"),
])
def test_yaml_a_recipe_cannot_hold_is_one_line_with_exit_2(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    one_error(usi_main("train", str(tmp_path / "r.yaml")), message)


def test_a_huge_value_is_not_echoed_back_whole(tmp_path):
    (tmp_path / "r.yaml").write_text('model:\n  kwargs: {x: "' + "a" * 200_000 + '"}\n  nosuch: 1\n')
    out = usi_main("train", str(tmp_path / "r.yaml"))
    assert out.returncode == 2 and len(out.stderr) < 3000, len(out.stderr)


def test_checkpoints_whose_weights_are_not_tensors_and_odd_export_targets_are_one_line(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    state = torch.load(run / "last.pt", weights_only=True)
    checkpoint.save({**{k: v for k, v in state.items() if k != "format"}, "student": {"w": [1, 2]}},
                    tmp_path / "odd.pt")
    one_error(usi_main("eval", str(tmp_path / "odd.pt"), f"data.root={image_root}"), "not a mapping of names")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    one_error(usi_main("export", str(run / "last.pt"), str(tmp_path / "dangling")), "is a link")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    assert usi_main("export", str(run / "last.pt"), str(mine)).returncode == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((mine / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_a_shard_index_that_undercounts_its_shard_is_reported(image_root, tmp_path):
    from usi.data.shard_writer import main as make_shards
    shards = tmp_path / "sh"
    assert make_shards([str(image_root / "train"), str(shards / "train"), "--shard-size", "16"]) == 0
    assert make_shards([str(image_root / "val"), str(shards / "val"), "--classes-from", str(image_root / "train"),
                        "--shard-size", "4"]) == 0
    index = json.loads((shards / "val" / "index.json").read_text())
    index["shards"][0]["count"] -= 2
    index["total"] -= 2
    (shards / "val" / "index.json").write_text(json.dumps(index))
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    out = usi_main("eval", str(run / "best.safetensors"), "data.format=shards", f"data.root={shards}")
    assert out.returncode == 0 and "holds 2 more samples than index.json says" in out.stderr, out.stderr
