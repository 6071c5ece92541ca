"""usi/training/tracking.py: TensorBoard and Weights & Biases beside metrics.jsonl."""
import pytest

from usi.training.tracking import check_available, flatten

from conftest import read_jsonl, usi_cmd, usi_main
from helpers import train_args


def test_tensorboard_gets_interval_losses_and_epoch_metrics(image_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    out = usi_main(*train_args(image_root, run, "run.loggers=[tensorboard]"))
    assert out.returncode == 0, out.stderr[-2000:]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/task_loss", "train/kd_loss", "train/lr", "train/img_per_s", "raw/top1", "ema/nll",
            "epoch_train/task_loss"} <= tags
    assert len(events.Scalars("train/task_loss")) == 2 * 4  # 8 steps an epoch, a point every 2 steps, 2 epochs
    top1 = [e.value for e in events.Scalars("raw/top1")]
    assert top1 == [r["raw"]["top1"] for r in read_jsonl(run / "metrics.jsonl")]
    assert [e.step for e in events.Scalars("raw/top1")] == [8, 16]  # keyed by the update count


FAKE_WANDB = '''
import json, os
# like wandb >= 0.31: no wandb.util.generate_id
class Run:
    def log(self, scalars, step): pass
    def finish(self): pass
def init(**kwargs):
    with open(os.environ["WANDB_CALLS"], "a") as f:
        f.write(json.dumps({k: kwargs[k] for k in ("id", "resume", "project")}) + "\\n")
    return Run()
'''


def test_a_wandb_run_keeps_its_id_across_a_resume(image_root, tmp_path):
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_WANDB)  # no network here: the calls usi makes are what is tested
    env = {"PYTHONPATH": str(tmp_path / "fake"), "WANDB_CALLS": str(tmp_path / "calls.jsonl")}
    run = tmp_path / "run"
    assert usi_cmd(*train_args(image_root, run, "run.loggers=[wandb]", "run.stop_after=1"), env=env).returncode == 0
    assert usi_cmd(*train_args(image_root, run, "run.loggers=[wandb]", "run.resume=auto"), env=env).returncode == 0
    calls = read_jsonl(tmp_path / "calls.jsonl")
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] and calls[0]["resume"] == "allow"
    assert len(calls[0]["id"]) == 8 and calls[0]["id"].isalnum() and calls[0]["id"].islower()  # wandb's id form


@pytest.mark.parametrize("logger, extra", [("wandb", "usi[wandb]"), ("tensorboard", "usi[tensorboard]")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(image_root, tmp_path, monkeypatch, logger, extra):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == logger else real(name, *a))
    for dry in ([], ["--dry-run"]):  # the dry run checks it too
        out = usi_main(*train_args(image_root, tmp_path / "r", f"run.loggers=[{logger}]"), *dry)
        assert out.returncode == 2 and f"pip install '{extra}'" in out.stderr and not (tmp_path / "r").exists()


def test_flatten_keys_nested_numbers_by_their_path_and_drops_the_rest():
    record = {"epoch": 3, "train": {"task_loss": 1.5, "images": 64, "ok": True},
              "raw": {"top1": 71.2, "members": [{"kl": 0.1}]}, "note": "text"}
    assert flatten(record) == {"train/task_loss": 1.5, "train/images": 64.0, "raw/top1": 71.2}
    assert all(type(v) is float for v in flatten(record).values())


def test_a_tracker_whose_package_exists_is_accepted(monkeypatch):
    import importlib.util

    from usi.errors import UsageError
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    check_available(["tensorboard", "wandb"])  # both found: no error
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    check_available([])  # none asked for: nothing to find
    with pytest.raises(UsageError, match=r"pip install 'usi\[wandb\]'"):
        check_available(["wandb"])
