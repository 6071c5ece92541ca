"""usi/training/tracking.py: TensorBoard and Weights & Biases beside metrics.jsonl."""
import importlib.util
import json

import pytest

from usi.training.tracking import check_available, flatten

from conftest import read_jsonl, usi_cmd, usi_main
from helpers import one_error, train_args

real_spec = importlib.util.find_spec


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
    summary = {}
    def log(self, scalars, step): pass
    def finish(self): pass
def init(**kwargs):
    with open(os.environ["WANDB_CALLS"], "a") as f:
        f.write(json.dumps({k: kwargs[k] for k in ("id", "resume", "project", "name", "tags")}) + "\\n")
    return Run()
'''


def test_a_wandb_run_keeps_its_id_across_a_resume(image_root, tmp_path):
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_WANDB)  # no network here: the calls usi makes are what is tested
    env = {"PYTHONPATH": str(tmp_path / "fake"), "WANDB_CALLS": str(tmp_path / "calls.jsonl")}
    run = tmp_path / "run"
    assert usi_cmd(*train_args(image_root, run, "run.loggers=[wandb]", "run.stop_after=1"), env=env).returncode == 0
    tagged = ["run.loggers=[wandb]", "run.resume=auto", "run.wandb_tags=[later]"]  # the W&B keys may change
    assert usi_cmd(*train_args(image_root, run, *tagged), env=env).returncode == 0
    calls = read_jsonl(tmp_path / "calls.jsonl")
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] and calls[0]["resume"] == "allow"
    assert [(c["project"], c["name"], c["tags"]) for c in calls] == [("usi", "run", []), ("usi", "run", ["later"])]
    assert len(calls[0]["id"]) == 8 and calls[0]["id"].isalnum() and calls[0]["id"].islower()  # wandb's id form


def wandb_records(run_dir):
    """Every record of the run's offline transaction logs (run_dir/wandb/offline-run-*/run-*.wandb), in order:
    wandb 0.31 has no Python reader of its own (its core, in Go, writes them), so this reads the LevelDB log
    format they are written in (a 7-byte file header; 32 KiB blocks of chunks, each with a 7-byte header:
    CRC, length, kind) and parses each record with wandb's own protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunks = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or kind == 0:  # a block's zero padding
                pos += left
                continue
            chunks += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                records.append(record)
                chunks = b""
    return records


def items_of(entries) -> dict:
    """W&B's history or summary items -> {"raw/top1": 71.2, ...} (nested keys joined by /)."""
    return {"/".join(e.nested_key) or e.key: json.loads(e.value_json) for e in entries}


def test_the_real_wandb_offline_gets_the_config_every_epoch_and_the_summary(image_root, tmp_path):
    """wandb itself, offline (no network): what reached the run is read back from the files it wrote."""
    pytest.importorskip("wandb")
    env = {f"WANDB_{k}": str(tmp_path / "wandb-home") for k in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    run = tmp_path / "run"
    keys = ["run.loggers=[wandb]", "run.wandb_project=kd-tests", "run.wandb_entity=lab", "run.wandb_name=tiny",
            "run.wandb_tags=[kd, test]"]
    out = usi_cmd(*train_args(image_root, run, *keys), env=env)  # the fake above covers the resume: one start
    assert out.returncode == 0, out.stderr[-2000:]
    records = wandb_records(run)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.run_id == (run / "wandb-id").read_text().strip()
    assert (start.project, start.entity, start.display_name, list(start.tags)) == ("kd-tests", "lab", "tiny",
                                                                                  ["kd", "test"])
    config = items_of(start.config.update)
    assert config["model"]["name"] == "test_resnet" and config["sched"]["epochs"] == 2
    history = [items_of(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [h for h in history if "raw/top1" in h]
    expected = read_jsonl(run / "metrics.jsonl")
    assert [h["raw/top1"] for h in epochs] == [r["raw"]["top1"] for r in expected]
    assert [h["epoch"] for h in epochs] == [1, 2] and [h["_step"] for h in epochs] == [8, 16]
    assert len([h for h in history if "train/task_loss" in h]) == 2 * 4  # 8 steps an epoch, one every 2
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items_of(r.summary.update))
    saved = json.loads((run / "summary.json").read_text())
    assert summary["best/value"] == saved["best"]["value"] and summary["final/ema/nll"] == saved["final"]["ema"]["nll"]


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


class Fake:
    def __init__(self, fail: bool):
        if fail:
            raise PermissionError(13, "Permission denied", "tensorboard")
        self.closed = False

    def log(self, scalars, step):
        pass

    def close(self):
        self.closed = True


def test_a_tracker_that_fails_to_start_is_one_line_and_closes_those_already_started(monkeypatch, tmp_path):
    from usi.errors import UsageError
    from usi.training import tracking

    started = []
    monkeypatch.setattr(tracking, "OPEN", {"good": lambda *a: started.append(Fake(False)) or started[-1],
                                           "bad": lambda *a: Fake(True)})
    with pytest.raises(UsageError, match=r"run.loggers: bad failed to start \(\[Errno 13\] Permission denied"):
        tracking.Trackers(["good", "bad"], tmp_path, {}, enabled=True)
    assert len(started) == 1 and started[0].closed


def failing_wandb(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("wandb")

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real_spec(name))


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_a_tracker_failing_at_start_leaves_nothing_that_blocks_the_corrected_command(image_root, tmp_path, monkeypatch,
                                                                                    logger):
    if logger == "wandb":
        failing_wandb(monkeypatch)
    else:  # its log folder cannot be made
        import torch.utils.tensorboard as tb

        def refuse(logdir, *a, **k):
            raise PermissionError(13, "Permission denied", logdir)
        monkeypatch.setattr(tb, "SummaryWriter", refuse)
    run = tmp_path / "runs" / "r"
    one_error(usi_main(*train_args(image_root, run, f"run.loggers=[{logger}]")), f"run.loggers: {logger} failed")
    assert not (tmp_path / "runs").exists()  # every folder and file this start made is gone
    monkeypatch.undo()
    out = usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0"))  # the corrected command
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_resumed_run_whose_tracker_fails_is_left_as_it_was_and_resumes_later(image_root, tmp_path, monkeypatch):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name in ("last.pt", "metrics.jsonl", "best.safetensors")}
    failing_wandb(monkeypatch)
    one_error(usi_main(*train_args(image_root, run, "run.resume=auto", "run.loggers=[wandb]")), "wandb failed")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in before} == before
    monkeypatch.undo()
    out = usi_main(*train_args(image_root, run, "run.resume=auto"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
