"""A real cluster's life: multi-node torchrun restarts, preemption signals, and what a run records."""
import json
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
from safetensors import safe_open

from usi.training import checkpoint


def train_args(root, run_dir, *extra):
    return ["train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra]


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


def kill_tree(pid: int) -> None:
    """torchrun starts each worker in a session of its own: kill those too, then the agent."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, procs, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, f"exited early with {p.returncode}"
        time.sleep(0.05)
    raise TimeoutError


def epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(read_jsonl(path)) if path.is_file() else 0


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- multi-node restarts


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


# ---------------------------------------------------------------- preemption

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


# ---------------------------------------------------------------- what a distributed run measures and records


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


def test_versions_are_recorded_and_a_resume_under_other_versions_warns(image_root, tmp_path):
    run = tmp_path / "run"
    assert usi_main(*train_args(image_root, run, "run.stop_after=1")).returncode == 0
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["versions"]["torch"] == torch.__version__ and state["versions"]["timm"]
    starts = json.loads((run / "versions.json").read_text())
    assert len(starts) == 1 and starts[0]["torch"] == torch.__version__
    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["versions"])["torch"] == torch.__version__
    state["versions"]["torch"] = "2.0.0"
    checkpoint.save({k: v for k, v in state.items() if k != "format"}, run / "last.pt")
    again = usi_main(*train_args(image_root, run, "run.resume=auto"))
    assert again.returncode == 0
    warnings = [x for x in again.stderr.splitlines() if "other versions" in x]
    assert len(warnings) == 1 and f"torch 2.0.0 -> {torch.__version__}" in warnings[0]
    assert len(json.loads((run / "versions.json").read_text())) == 2
