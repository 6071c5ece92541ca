"""usi/training/soft_label_pass.py: `usi soft-labels`: the store is complete and checksummed, a killed or
damaged one is finished where it broke, top-K stores less, bad values are one line."""
import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from usi.distill import soft_labels as store

from conftest import REPO, TINY, usi_main
from helpers import ENV, one_error, soft_label_store, teacher_file, train, train_args, wait_for


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(7)
    path = teacher_file(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    return ["teacher.name=test_resnet", f"teacher.weights={path}"]


@pytest.fixture(scope="module")
def full_store(image_root, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    done = soft_label_store(image_root, out, teacher)
    assert done.returncode == 0, done.stderr
    return out


def test_the_writer_resumes_at_missing_or_damaged_chunks(image_root, teacher, full_store, tmp_path):
    out = tmp_path / "s"
    for f in full_store.iterdir():
        (out / f.name).parent.mkdir(exist_ok=True)
        (out / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    store.write_manifest(out, {**manifest, "complete": False})  # as a writer killed before it finished
    (out / store.chunk_name(1, 0, 3)).unlink()
    damaged = out / store.chunk_name(0, 0, 6)
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    again = soft_label_store(image_root, out, teacher)
    assert again.returncode == 0, again.stderr
    assert "(2 written now by rank 0)" in again.stderr
    assert json.loads((out / "manifest.json").read_text())["chunks"] == manifest["chunks"]  # the same bytes


def test_top_k_stores_less_and_trains(image_root, teacher, tmp_path):
    out = tmp_path / "k2"
    assert soft_label_store(image_root, out, teacher, flags=("--top-k", "2")).returncode == 0
    values = store.read_chunk(out, store.chunk_name(0, 0, 0), json.loads((out / "manifest.json").read_text())
                              ["chunks"][store.chunk_name(0, 0, 0)])
    assert values["values"].shape[1] == 2 and values["indices"].dtype == torch.int16
    run = train(image_root, tmp_path / "r", *teacher, f"teacher.soft_labels={out}", "sched.epochs=2")
    assert run.returncode == 0, run.stderr


def test_bad_values_are_one_line(image_root, teacher, tmp_path):
    one_error(soft_label_store(image_root, tmp_path / "a", teacher, flags=("--top-k", "9")), "--top-k 9: expected 1..4")
    one_error(soft_label_store(image_root, tmp_path / "b", ["teacher.name=null"]), "teacher.name is null")
    one_error(usi_main(*train_args(image_root, tmp_path / "r", *teacher, f"teacher.soft_labels={tmp_path}")),
              "is not a soft-label store")
    one_error(usi_main(*train_args(image_root, tmp_path / "r", "aug.randaugment_fill=[1, 2]")),
              "aug.randaugment_fill=[1, 2]: expected 3 integers 0..255")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "f.safetensors"))
    one_error(soft_label_store(image_root, tmp_path / "f.safetensors", teacher), "is a file, not a folder")
    one_error(soft_label_store(image_root, tmp_path / "f.safetensors" / "x", teacher), "is not a writable directory")
    one_error(soft_label_store(image_root, tmp_path / "c", teacher, flags=("--top-k", "0")), "--top-k 0: expected 1")
    assert not (tmp_path / "c").exists()


def test_sigterm_stops_the_writer_in_one_line_and_the_same_command_writes_the_rest(image_root, teacher, tmp_path):
    out = tmp_path / "s"
    args = ["soft-labels", "quickstart", *TINY, f"data.root={image_root}", *teacher, "sched.epochs=6", "--out",
            str(out), "--steps-per-chunk", "1"]
    writer = subprocess.Popen([sys.executable, "-m", "usi", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(out.glob("*.sha256")), [writer])
    writer.send_signal(signal.SIGTERM)
    _, stderr = writer.communicate(timeout=120)
    assert writer.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == ("usi: stopped by SIGTERM: the chunks written so far are kept; the same "
                                               "usi soft-labels command writes the rest")
    kept = len(list(out.glob("*.sha256")))
    assert not json.loads((out / "manifest.json").read_text())["complete"] and kept >= 1
    again = usi_main(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and f"({len(manifest['chunks']) - kept} written now by rank 0)" in again.stderr


def test_one_writer_at_a_time_and_a_killed_writers_temporaries_go(image_root, teacher, full_store, tmp_path):
    import fcntl

    out = tmp_path / "s"
    out.mkdir()
    for f in full_store.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    stale = out / ".e0001-r000-s000003.safetensors.tmp-48irnai7"  # what kill -9 mid-write leaves
    stale.write_bytes(b"half")
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer at work
        one_error(soft_label_store(image_root, out, teacher), "is being written by another usi soft-labels")
    assert stale.exists()  # not touched while another writer held the store
    again = soft_label_store(image_root, out, teacher)
    assert again.returncode == 0, again.stderr
    assert not stale.exists() and "(0 written now by rank 0)" in again.stderr


def test_out_that_cannot_be_a_folder_is_one_line_and_a_damaged_store_is_refused(image_root, teacher, full_store,
                                                                                  tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    one_error(soft_label_store(image_root, tmp_path / "dangling", teacher), "is a symbolic link to nothing")
    out = tmp_path / "s"
    out.mkdir()
    for f in full_store.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "steps_per_chunk": 0}))
    one_error(soft_label_store(image_root, out, teacher), "manifest.json is damaged (steps_per_chunk is 0")
