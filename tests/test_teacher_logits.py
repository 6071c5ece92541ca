"""usi/evaluation/teacher_logits.py: the teacher's val logits on disk and what their key depends on."""
import json

import torch

from usi.distill.teacher import Ensemble, Teacher
from usi.recipe import TeacherSection as TeacherCfg

from conftest import usi_main
from helpers import ensemble_args, teacher_file, teacher_files, train, train_args

SAME = dict(student_mean=(0.5,) * 3, student_std=(0.5,) * 3, teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3)


def test_teacher_logit_cache_key_depends_on_the_precision_of_the_pass():
    from usi.evaluation.teacher_logits import cache_key
    from usi.models import Compute
    teacher = Teacher(torch.nn.Identity(), **SAME)
    cfg = TeacherCfg(name="test_resnet")
    cpu = torch.device("cpu")
    computes = [Compute(cpu), Compute(cpu, torch.bfloat16), Compute(cpu, None, True)]
    keys = {cache_key([cfg], "probs", split_identity="files", teacher=teacher, compute=c) for c in computes} | {
        cache_key([cfg], "probs", split_identity="other", teacher=teacher, compute=computes[0])}
    assert len(keys) == 4
    # an ensemble: its members, their order and the way they combine are in the key too
    other = TeacherCfg(name="test_efficientnet")
    pair = Ensemble([teacher, Teacher(torch.nn.Identity(), **SAME)])
    ensembles = {cache_key(cfgs, how, split_identity="files", teacher=pair, compute=computes[0])
                 for cfgs in ([cfg, other], [other, cfg]) for how in ("probs", "logits")}
    assert len(ensembles) == 4 and not ensembles & keys


def test_an_empty_usi_cache_is_the_default_never_the_current_directory(monkeypatch, tmp_path):
    from usi.evaluation.teacher_logits import cache_dir
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USI_CACHE", "")
    assert cache_dir() == tmp_path / "home" / ".cache" / "usi" / "teacher-logits"
    monkeypatch.setenv("USI_CACHE", "~/elsewhere")  # quoted in a script: still the home folder, not a "~" folder
    assert cache_dir() == tmp_path / "home" / "elsewhere" / "teacher-logits"


def test_the_teacher_line_says_what_the_cache_did(image_root, tmp_path, monkeypatch):
    from usi.runtime import files
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    teacher = teacher_file(tmp_path / "t.safetensors")
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={teacher}",
                               "sched.epochs=1", "sched.warmup_epochs=0"), env={"USI_CACHE": str(blocker)})
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stderr.splitlines() if "teacher val top-1" in x]  # a cache that cannot be, one line
    assert f"computed; not cached: {blocker / 'teacher-logits'} is not writable (" in line, line
    evaluate = ("eval", str(tmp_path / "r" / "best.safetensors"), f"data.root={image_root}",
                f"teacher.weights={teacher}")
    cache = {"USI_CACHE": str(tmp_path / "cache")}

    def read_only(path, write):
        raise PermissionError(13, "Permission denied", str(path))
    with monkeypatch.context() as m:  # a folder this user may not write (root ignores chmod: simulated)
        m.setattr(files, "atomic_write", read_only)
        report = usi_main(*evaluate, env=cache)
    assert (f"logits computed; not cached: {tmp_path / 'cache' / 'teacher-logits'} is not writable "
            f"(Permission denied)") in report.stdout, report.stdout + report.stderr
    assert "from the cache" not in report.stdout and "computed and cached" not in report.stdout
    for note in ("computed and cached", "from the cache"):  # a writable folder: stored, then read back
        report = json.loads(usi_main(*evaluate, "--json", env=cache).stdout)
        assert report["teacher_cache"] == note and report["teacher_cached"] is (note == "from the cache")


def test_a_changed_member_is_a_new_cache_entry(image_root, tmp_path):
    paths = teacher_files(tmp_path)
    out = train(image_root, tmp_path / "run", *ensemble_args(paths), "sched.epochs=1", "sched.warmup_epochs=0")
    assert out.returncode == 0, out.stderr
    ckpt = str(tmp_path / "run" / "best.safetensors")
    logits = "teacher.combine=logits"
    for args, hit in (([], True), ([logits], False), ([logits], True)):
        report = usi_main("eval", ckpt, f"data.root={image_root}", *ensemble_args(paths)[1:], *args, "--json")
        assert json.loads(report.stdout)["teacher_cached"] is hit, (args, report.stderr)
