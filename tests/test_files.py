"""usi/runtime/files.py: weight files: not-a-checkpoint, damaged bytes and metadata, hostile pickles, atomic writes
and their leftovers, permissions; inputs that are not regular files, sizes a file declares past what it holds, a
full disk."""
import errno
import json
import os
import shutil
import signal
import stat
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from usi.errors import UsageError
from usi.runtime import files
from usi.training import checkpoint

from conftest import Payload, usi_main
from helpers import one_error, teacher_file, train_args


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


@pytest.mark.parametrize("make, message", [
    (lambda t: ["teacher.name=test_resnet", f"teacher.weights={teacher_in(t, 1000)}"],
     "teacher test_resnet predicts 1000 classes but the dataset has 4"),
    (lambda t: [f"run.dir={blocker(t)}/run"], "is not a writable directory"),
    (lambda t: [f"run.resume={evil(t)}"], "refused to load"),
    (lambda t: ["teacher.name=test_resnet", f"teacher.weights={evil(t)}"], "refused to load"),
])
def test_bad_files_end_in_one_line_exit_2_and_no_side_effect(image_root, tmp_path, make, message):
    os.environ["USI_PWNED"] = str(tmp_path / "pwned")
    args = train_args(image_root, tmp_path / "r") + make(tmp_path)
    out = usi_main(*args)
    assert out.returncode == 2, out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("usi: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "pwned").exists()


def teacher_in(tmp_path, classes):
    import timm
    path = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=classes).state_dict(), str(path))
    return path


def blocker(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


def evil(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "student": {}, "x": Payload()}, path)
    return path


@pytest.fixture()
def no_blocking():
    """A read that blocks (a named pipe) fails the test instead of hanging it."""
    def hung(signum, frame):
        raise TimeoutError("usi blocked on a file")
    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("kind, reason", [("dir", "is a directory, not a file"),
                                          ("pipe", "is not a regular file (a named pipe)"),
                                          ("zero", "is not a regular file (a character device)")])
@pytest.mark.parametrize("use", ["teacher.weights", "model.weights", "run.resume", "usi eval", "recipe"])
def test_inputs_that_are_not_regular_files_are_refused_at_once_with_their_reason(image_root, tmp_path, no_blocking,
                                                                                 kind, reason, use):
    path = tmp_path / "input.pt"
    {"dir": path.mkdir, "pipe": lambda: os.mkfifo(path), "zero": lambda: path.symlink_to("/dev/zero")}[kind]()
    if use == "usi eval":
        out = usi_main("eval", str(path), f"data.root={image_root}")
    elif use == "recipe":
        out = usi_main("train", str(path.rename(tmp_path / "input.yaml")), f"data.root={image_root}")
    else:
        extra = ["teacher.name=test_resnet"] if use == "teacher.weights" else []
        out = usi_main(*train_args(image_root, tmp_path / "r", *extra, f"{use}={path}"))
    one_error(out, reason)  # before: "does not exist", or a read of /dev/zero without end, or a pipe's wait
    assert not (tmp_path / "r").exists()


def deflated(plain, path):
    """The zip checkpoint `plain` with its parts compressed (torch.save stores them as they are)."""
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for part in src.infolist():
            dst.writestr(part.filename, src.read(part))
    return path


def test_a_compressed_checkpoint_that_inflates_past_its_bound_is_refused_before_loading(image_root, tmp_path,
                                                                                         monkeypatch):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2_000_000)}, plain)  # 8 MB of zeros
    bomb = deflated(plain, tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 20_000
    with pytest.raises(UsageError, match=r"refused to load .*bomb.pt: .* declare 80\d{5} bytes once inflated"):
        files.check_zip(bomb, limit=1 << 20)
    files.check_zip(plain, limit=1 << 20)  # stored parts hold what they declare: the file itself bounds them
    assert files.load_state_file(bomb)["w"].shape == (2_000_000,)  # under the default bound: a compressed file loads
    monkeypatch.setattr(files, "MIN_INFLATED", 1 << 20)
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={bomb}"))
    one_error(out, f"refused to load {bomb}")
    assert not (tmp_path / "r").exists()


def test_declared_sizes_past_what_the_file_holds_are_refused_before_anything_is_allocated(image_root, tmp_path):
    old = tmp_path / "old.pt"  # torch < 1.6's format: torch.load allocates each storage at its declared size
    torch.save({"w": torch.zeros(123)}, old, _use_new_zipfile_serialization=False)
    assert files.load_state_file(old)["w"].shape == (123,)
    data = old.read_bytes()
    old.write_bytes(data.replace(b"K\x7b", b"J" + struct.pack("<i", 2**31 - 1), 1))  # the storage's element count
    with pytest.raises(UsageError, match=r"old.pt: its \d+-byte file declares storages of 2147483647 elements"):
        files.load_state_file(old)
    strided = tmp_path / "strided.pt"  # a small storage under a huge shape (stride 0): any use allocates the shape
    torch.save({"fc.weight": torch.zeros(4).expand(10**11, 4)}, strided)
    assert strided.stat().st_size < 10_000
    out = usi_main(*train_args(image_root, tmp_path / "r", "teacher.name=test_resnet", f"teacher.weights={strided}"))
    one_error(out, f"{strided} is not a usable checkpoint: its tensor fc.weight (100000000000, 4) declares more")
    lying = tmp_path / "lying.safetensors"  # a header whose offsets reach past the file
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode()
    lying.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(UsageError, match=r"lying.safetensors is not a readable safetensors file"):
        files.load_state_file(lying)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save, measured
    RuntimeError("basic_ios::clear: iostream error"),  # torch.save when the disk was full from its first byte
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
])
def test_a_full_disk_says_so_and_that_the_previous_file_is_intact(tmp_path, monkeypatch, failure):
    path = tmp_path / "last.pt"
    checkpoint.save({"student": {"w": torch.zeros(3)}, "epoch": 3}, path)
    monkeypatch.setattr(files, "free_bytes", lambda folder: 0)  # torch's errors carry no errno: the space left tells

    def full(tmp):
        tmp.write_bytes(b"half a checkp")
        raise failure

    with pytest.raises(UsageError, match=rf"^disk full while writing {path}; the previous last.pt is intact"):
        files.atomic_write(path, full)
    assert checkpoint.load(path)["epoch"] == 3 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(UsageError, match="no earlier best.safetensors was there"):
        files.atomic_write(tmp_path / "best.safetensors", full)


def test_a_torch_write_failure_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda folder: 10 << 30)

    def failing(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(RuntimeError, match="unexpected pos"):
        files.atomic_write(tmp_path / "last.pt", failing)


def test_an_atomic_write_never_goes_through_a_link_planted_at_its_temporary_or_final_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / f".out.json.tmp-{os.getpid()}").symlink_to(victim)  # the temporary name a writer could guess
    (folder / "final.json").symlink_to(victim)
    files.atomic_write(folder / "out.json", lambda tmp: open(tmp, "w").write("new"))
    files.atomic_write(folder / "final.json", lambda tmp: open(tmp, "w").write("new"))
    assert victim.read_text() == "precious"
    assert (folder / "out.json").read_text() == "new"
    assert not (folder / "final.json").is_symlink() and (folder / "final.json").read_text() == "new"


def test_open_own_appends_to_a_plain_file_and_refuses_every_kind_of_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "soft").symlink_to(victim)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.link(victim, tmp_path / "hard")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for name, why in (("soft", "is a symbolic link"), ("dangling", "is a symbolic link"),
                      ("hard", "is a hard link"), ("fifo", "is not a plain file"), ("folder", "is not a plain file")):
        with pytest.raises(UsageError, match=why):
            files.open_own(tmp_path / name)
    assert victim.read_text() == "precious" and not (tmp_path / "nowhere").exists()
    for _ in range(2):
        with files.open_own(tmp_path / "log.txt") as f:
            f.write("line\n")
    assert (tmp_path / "log.txt").read_text() == "line\nline\n"
