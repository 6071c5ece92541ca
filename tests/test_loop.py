"""usi/training/loop.py: how the epoch loop ends a run that cannot go on."""
import shutil

from conftest import usi_main
from helpers import one_error, train_args


def test_a_run_whose_every_update_is_skipped_does_not_exit_0(image_root, tmp_path):
    out = usi_main(*train_args(image_root, tmp_path / "r", "optim.lr=1e30", "run.max_nonfinite=1000", "sched.epochs=3",
                              "sched.warmup_epochs=0", "ema.enabled=false"))
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("usi: stopped")]
    assert "every one of the 8 updates of epoch" in line and "skipped as non-finite" in line
    assert not (tmp_path / "r" / "summary.json").exists()


def test_val_data_that_is_all_unreadable_ends_in_one_line(image_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    for path in (data / "val").rglob("*.jpg"):
        path.write_bytes(b"not an image")
    one_error(usi_main(*train_args(data, tmp_path / "r")), "no val image could be read (12 unreadable")


def test_a_diverging_run_stops_naming_the_update_lr_and_checkpoint(image_root, tmp_path):
    out = usi_main(*train_args(image_root, tmp_path / "r", "optim.lr=1e30", "run.max_nonfinite=2", "sched.epochs=3",
                              "sched.warmup_epochs=0", "ema.enabled=false"))
    assert out.returncode == 1
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("usi: stopped")]
    assert "non-finite updates in a row (run.max_nonfinite=" in line and "lr now" in line and "checkpoint" in line
