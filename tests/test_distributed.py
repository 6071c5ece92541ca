"""usi/runtime/distributed.py: torchrun end to end (gloo, CPU): two processes, multi-node restarts, a killed rank."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, read_jsonl, usi_cmd, usi_main
from helpers import (
    ENV,
    children,
    ensemble_args,
    epochs_done,
    kill_tree,
    rank_of,
    start,
    teacher_files,
    train,
    train_args,
    wait_for,
    wait_for_epochs,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scenario", ["kill rank 1", "kill rank 0", "stop rank 0, kill rank 1",
                                      "stop rank 1, kill rank 0"])
def test_two_torchrun_agents_recover_whichever_node_loses_a_worker(image_root, tmp_path, scenario):
    """Two agents (two 'nodes') on this machine, c10d rendezvous, --max-restarts=3. Killing a worker,
    or stopping one node's worker while the other node's dies (the membership-change restart that
    torchrun does not count), must end in a finished run, not a hang."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=usi-test",
           "--max-restarts=3", "-m", "usi", *train_args(image_root, run, "sched.epochs=4", "data.batch_size=4",
                                                          "optim.global_batch=8", "run.resume=auto")]
    logs = [open(tmp_path / f"agent{i}.log", "w") for i in range(2)]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
              for log in logs]
    try:
        wait_for(lambda: epochs_done(run) >= 1, agents)
        workers = {rank_of(w): w for a in agents for w in children(a.pid)}
        assert sorted(workers) == [0, 1]
        if scenario.startswith("kill"):
            os.kill(workers[int(scenario[-1])], signal.SIGKILL)
        else:
            stopped, killed = workers[int(scenario[10])], workers[int(scenario[-1])]
            os.kill(stopped, signal.SIGSTOP)
            os.kill(killed, signal.SIGKILL)
            time.sleep(8)
            os.kill(stopped, signal.SIGCONT)
        codes = [a.wait(timeout=240) for a in agents]
    finally:
        for a in agents:
            kill_tree(a.pid)
    output = "".join((tmp_path / f"agent{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], output[-3000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 4
    assert "resumed from" in output


def test_two_process_logged_metrics_are_those_of_the_saved_weights(image_root, tmp_path):
    """Each rank's BatchNorm statistics move with its own batches: evaluation must use rank 0's, the saved ones."""
    run = tmp_path / "ddp"
    out = usi_cmd(*train_args(image_root, run, "data.batch_size=4", "optim.global_batch=8", "sched.epochs=2"),
                  torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_jsonl(run / "metrics.jsonl")
    best = json.loads((run / "summary.json").read_text())["best"]
    logged = records[best["epoch"] - 1][best["weights"]]
    for ckpt, expected in ((run / "best.safetensors", {best["weights"]: logged}),
                           (run / "last.pt", {k: records[-1][k] for k in ("raw", "ema")})):
        report = usi_main("eval", str(ckpt), f"data.root={image_root}", "--json")  # one process: the same sums
        assert report.returncode == 0, report.stderr[-2000:]
        measured = json.loads(report.stdout)["students"]
        for name, metrics in expected.items():
            assert measured[name]["top1"] == metrics["top1"] and measured[name]["count"] == metrics["count"]
            assert measured[name]["nll"] == pytest.approx(metrics["nll"], rel=1e-6)


def test_two_process_torchrun_gloo_run_end_to_end(image_root, tmp_path):
    out = train(image_root, tmp_path / "ddp", "data.batch_size=4", "optim.global_batch=8", torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    epochs = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["ema"]["count"] == 12 for e in epochs)  # each val image counted once over both ranks
    assert "global batch 8 = 4 x 2 processes x 1 accumulation" in out.stderr
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["epochs"] == 2


def worker_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def test_a_rank_killed_under_torchrun_max_restarts_resumes_by_itself(image_root, tmp_path):
    run = tmp_path / "ddp"
    # 5 epochs: a wide window for the kill after epoch 1, even on a fast machine
    args = train_args(image_root, run, "sched.epochs=5", "data.batch_size=4", "optim.global_batch=8",
                      "run.resume=auto")
    proc = start(args, torchrun=2, max_restarts=1)
    wait_for_epochs(run, 1, proc)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 5


def test_ensemble_feature_kd_and_bf16_under_torchrun_with_shards(image_root, tmp_path):
    """An ensemble with feature KD, bf16 autocast, mixup/cutmix, repeats, shards, two processes, a stop
    and a resume: the whole family composes."""
    import subprocess
    import sys

    from conftest import REPO

    for split in ("train", "val"):
        subprocess.run([sys.executable, "-m", "usi", "shards", str(image_root / split),
                        str(tmp_path / "shards" / split), "--classes-from", str(image_root / "train"),
                        "--shard-size", "8"], cwd=REPO, check=True, capture_output=True)
    paths = teacher_files(tmp_path)
    extra = [*ensemble_args(paths), "features.student=layer3", "features.teacher=layer4", "run.amp_on_cpu=true",
             "data.format=shards", "data.batch_size=4", "optim.global_batch=8"]
    args = ("train", "quickstart", *TINY, f"data.root={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}", *extra)
    first = usi_cmd(*args, "run.stop_after=1", torchrun=2)
    assert first.returncode == 0, first.stderr[:3000]
    again = usi_cmd(*args, "run.resume=auto", torchrun=2)
    assert again.returncode == 0, again.stderr[-2000:]
    epochs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert e["train"]["kd_loss"] > 0 and math.isfinite(e["train"]["feature_loss"])
        assert e["raw"]["count"] == 12 and len(e["raw"]["members"]) == 3
    assert torch.load(tmp_path / "run" / "last.pt")["projector"]
