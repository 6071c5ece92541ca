"""usi/runtime/preempt.py: SIGTERM / SIGINT stop every rank after the same update, with a checkpoint, in any phase."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from usi.training import checkpoint

from conftest import REPO, read_jsonl, usi_cmd
from helpers import ENV, children, epochs_done, kill_tree, rank_of, train_args, wait_for

SLOW = ["data.input_size=48", "data.batch_size=2", "optim.global_batch=4", "sched.epochs=3", "run.log_interval=4"]


def start(args, torchrun=0):
    prefix = [sys.executable, "-m", "usi"]
    if torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                  "-m", "usi"]
    return subprocess.Popen(prefix + args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def check_stopped_and_resume(image_root, run, err, code, signame, torchrun=0):
    assert code == {"SIGTERM": 143, "SIGINT": 130}[signame] or torchrun, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("usi: stopped by")]
    assert len(lines) == 1 and signame in lines[0] and f"checkpoint {run / 'last.pt'}" in lines[0], err[-3000:]
    assert "continue with run.resume=auto" in lines[0] and "Traceback" not in err
    state = checkpoint.load(run / "last.pt")
    assert state["step"] % 2 == 0  # 2 micro-batches per update: it stopped after a whole update
    assert state["num_updates"] == state["epoch"] * 16 + state["step"] // 2  # 64 images / 2 per step / 2 accum
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, state["epoch"] + 1))
    again = usi_cmd(*train_args(image_root, run, *SLOW, "run.resume=auto"), torchrun=torchrun)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert checkpoint.load(run / "last.pt")["num_updates"] == 3 * 16


@pytest.mark.parametrize("signame, second, workers", [("SIGTERM", "SIGTERM", 0), ("SIGINT", "SIGINT", 0),
                                                     ("SIGTERM", "SIGTERM", 2), ("SIGINT", "SIGTERM", 2)])
def test_a_signal_stops_after_the_update_with_a_checkpoint_and_resume_continues(image_root, tmp_path, signame,
                                                                                 second, workers):
    """To the whole process group, as Ctrl-C and Slurm do: with loader workers, SIGTERM kills them, and
    the run stops at the last finished update instead of crashing (also when SIGTERM comes second, as
    when a Ctrl-C is followed by the scheduler's SIGTERM)."""
    run = tmp_path / "run"
    proc = start(train_args(image_root, run, *SLOW, f"data.workers={workers}"))
    wait_for(lambda: epochs_done(run) >= 1, [proc])
    os.killpg(proc.pid, getattr(signal, signame))  # the whole group, as Ctrl-C and Slurm do: loader workers too
    time.sleep(0.05)
    os.killpg(proc.pid, getattr(signal, second))  # a second signal while stopping changes nothing
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    check_stopped_and_resume(image_root, run, err, proc.returncode, signame)


@pytest.mark.parametrize("target", ["one rank", "the whole group"])
def test_torchrun_ranks_agree_on_the_stop_whoever_gets_the_signal(image_root, tmp_path, target):
    run = tmp_path / "run"
    # 2 per rank x 2 ranks x 2 accumulated = 8 per update, 8 updates per epoch; one loader worker per rank
    ddp = [*SLOW, "optim.global_batch=8", "data.workers=1"]
    proc = start(train_args(image_root, run, *ddp), torchrun=2)
    wait_for(lambda: epochs_done(run) >= 1, [proc])
    workers = {rank_of(w): w for w in children(proc.pid)}
    if target == "one rank":
        os.kill(workers[1], signal.SIGTERM)  # rank 0, which writes the checkpoint, got nothing
    else:  # as Slurm does: every process (torchrun's workers lead sessions of their own)
        for group in (proc.pid, *workers.values()):
            os.killpg(group, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0  # torchrun reports the stopped workers
    state = checkpoint.load(run / "last.pt")
    assert state["step"] % 2 == 0 and state["num_updates"] == state["epoch"] * 8 + state["step"] // 2
    lines = [x for x in err.splitlines() if x.startswith("usi: stopped by SIGTERM")]
    assert len(lines) == 1, err[-3000:]
    again = usi_cmd(*train_args(image_root, run, *ddp, "run.resume=auto"), torchrun=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert checkpoint.load(run / "last.pt")["num_updates"] == 3 * 8


# A stop signal outside the training steps, made deterministic: the driver runs usi in its own process and
# sends the signal from inside the phase under test (for the evaluation, as a SIGTERM to the process group
# would: the val loader's workers are gone).
DRIVER = """
import os, signal, sys
import usi.training.loop as T
from usi.evaluation.evaluate import LoaderBroken
phase, calls = sys.argv.pop(1), []
real = getattr(T, phase)
def during(*args):
    calls.append(1)
    if phase == "val_teacher":
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    if len(calls) == 2:  # epoch 2's evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        raise LoaderBroken("evaluation's data loader failed: DataLoader worker (pid 1) exited unexpectedly")
    return real(*args)
setattr(T, phase, during)
from usi.cli import main
sys.exit(main(sys.argv[1:]))
"""


def drive(phase, *args):
    return subprocess.run([sys.executable, "-c", DRIVER, phase, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_a_signal_during_evaluation_keeps_the_epoch_and_the_resume_evaluates_it(image_root, tmp_path):
    args = [*SLOW, "data.workers=1"]
    whole = usi_cmd(*train_args(image_root, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "run"
    stopped = drive("evaluate_epoch", *train_args(image_root, run, *args))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    (line,) = [x for x in stopped.stderr.splitlines() if x.startswith("usi: stopped by SIGTERM")]
    assert "epoch 2's evaluation" in line and "Traceback" not in stopped.stderr
    assert line in (run / "log.txt").read_text()  # log.txt says how the run ended too
    state = checkpoint.load(run / "last.pt")
    assert (state["epoch"], state["step"], state["num_updates"]) == (1, 32, 32)  # epoch 2 trained, not evaluated
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    again = usi_cmd(*train_args(image_root, run, *args, "run.resume=auto"))
    assert again.returncode == 0, again.stderr[-3000:]
    records, expected = read_jsonl(run / "metrics.jsonl"), read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for got, want in zip(records, expected):  # the same training, and the same evaluation of it
        assert got["train"]["task_loss"] == want["train"]["task_loss"] and got["raw"] == want["raw"]
    final, reference = checkpoint.load(run / "last.pt"), checkpoint.load(tmp_path / "whole" / "last.pt")
    assert all(torch.equal(final["student"][k], v) for k, v in reference["student"].items())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_time_s"] >= summary["train_time_s"]  # both invocations, start-up included


def test_a_signal_during_the_teachers_val_pass_stops_with_a_checkpoint(image_root, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    import timm
    from safetensors.torch import save_file
    save_file(timm.create_model("test_resnet", num_classes=4).state_dict(), str(teacher))
    kd = ["teacher.name=test_resnet", f"teacher.weights={teacher}"]
    run = tmp_path / "run"
    stopped = drive("val_teacher", *train_args(image_root, run, *kd))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    (line,) = [x for x in stopped.stderr.splitlines() if x.startswith("usi: stopped by SIGTERM")]
    assert "before the first update" in line and "continue with run.resume=auto" in line
    assert checkpoint.load(run / "last.pt")["num_updates"] == 0
    again = usi_cmd(*train_args(image_root, run, *kd, "run.resume=auto"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_raising_interrupted_turns_a_signal_into_one_line_and_restores_the_handler():
    """For phases with no update to finish (usi shards' pool, usi table's cost measuring)."""
    import os
    import signal as signals

    from usi.runtime import preempt

    before = signals.getsignal(signals.SIGTERM)
    with pytest.raises(preempt.Interrupted) as e, preempt.raising_interrupted(lambda name: f"stopped by {name}"):
        os.kill(os.getpid(), signals.SIGTERM)
        time.sleep(5)  # the handler raises here
    assert e.value.exit_code == 143 and str(e.value) == "stopped by SIGTERM"
    assert signals.getsignal(signals.SIGTERM) is before
