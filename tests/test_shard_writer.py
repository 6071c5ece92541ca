"""usi/data/shard_writer.py: `usi shards`: what it writes, what it refuses."""
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from usi.data.shard_writer import claim, write_shard
from usi.errors import UsageError

from conftest import REPO, usi_main
from helpers import train_args


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
    assert run.returncode == 0 and "skipped a" not in run.stderr, run.stderr[-2000:]
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


def test_the_shard_writer_never_writes_through_a_planted_link(image_root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "shards"
    out.mkdir()
    (out / f".s-000000.tar.tmp-{os.getpid()}").symlink_to(victim)  # the temporary name a writer could guess
    image = next((image_root / "train").rglob("*.jpg"))
    name, written, bad = write_shard((str(out / "s-000000.tar"), [("k0", str(image), 0)], False))
    assert (name, written, bad) == ("s-000000.tar", 1, []) and victim.read_text() == "precious"
    (out / ".make_shards.lock").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="is a symbolic link"):
        claim(out, {})
    assert not (tmp_path / "nowhere").exists()


def test_sigterm_stops_the_workers_says_one_line_and_the_same_command_finishes(tmp_path):
    """Before: four worker tracebacks. Now: the workers end with the writer, one line, and a rerun keeps the
    finished shards and writes the rest (a half-written shard stays a temporary file, removed then)."""
    import glob
    import signal
    import time

    from usi.data.synthetic import make_dataset

    src = make_dataset(tmp_path / "src", train_per_class=150, val_per_class=1, size=48, num_classes=4) / "train"
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "usi", "shards", str(src), str(out), "--workers", "2", "--shard-size", "2"]
    writer = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(glob.glob(f"{out}/*.tar")) < 3:
        assert writer.poll() is None and time.time() < deadline
        time.sleep(0.02)
    workers = [int(pid) for pid in open(f"/proc/{writer.pid}/task/{writer.pid}/children").read().split()]
    writer.send_signal(signal.SIGTERM)
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("usi:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "the same command writes the rest" in lines[0]
    assert workers and not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                               for pid in workers)
    kept = len(glob.glob(f"{out}/*.tar"))
    assert 3 <= kept < 300 and not (out / "index.json").exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "600 samples in 300 shards" in again.stdout and not glob.glob(f"{out}/.*.tmp-*")
