"""usi/studies/launch.py: child processes in slots of their own, and the user's signal passed to each."""
import os
import signal
import sys
import threading
import time

import pytest

from usi.errors import UsageError
from usi.runtime.preempt import Interrupted
from usi.studies import launch
from usi.studies.launch import Children


def test_cpu_slots_split_the_cores_and_gpu_slots_get_their_own_devices(monkeypatch):
    monkeypatch.setattr(launch, "cores", lambda: 16)
    assert launch.slot_envs(2, 1, 0) == [{"OMP_NUM_THREADS": "8"}] * 2
    assert launch.slot_envs(4, 2, 0) == [{"OMP_NUM_THREADS": "2"}] * 4
    assert launch.slot_envs(32, 1, 0) == [{"OMP_NUM_THREADS": "1"}] * 32  # never zero threads
    assert launch.slot_envs(2, 2, 4) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    with pytest.raises(UsageError, match="jobs=3 x nproc=2 needs 6 GPUs; this machine has 4"):
        launch.slot_envs(3, 2, 4)


def test_a_child_runs_with_its_slots_environment_and_its_output_in_its_log(tmp_path):
    children = Children([{"OMP_NUM_THREADS": "3"}])
    code = children.run([sys.executable, "-c", "import os, sys; print(os.environ['OMP_NUM_THREADS']); "
                         "print('err', file=sys.stderr); sys.exit(4)"], tmp_path / "a" / "run.log")
    assert code == 4 and (tmp_path / "a" / "run.log").read_text().split() == ["3", "err"]
    code = children.run([sys.executable, "-c", "print(42)"], tmp_path / "b.log", stdout=tmp_path / "b.out")
    assert code == 0 and (tmp_path / "b.out").read_text() == "42\n" and (tmp_path / "b.log").read_text() == ""


# A child that, like `usi train`, checkpoints on SIGTERM and exits 128 + 15; its grandchild is in its group.
CHILD = """
import signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
def stop(signum, frame):
    open(sys.argv[1], "w").write(str(signum))
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
print("ready", grandchild.pid, flush=True)
time.sleep(60)
"""


def ready(log):
    return log.exists() and "ready" in log.read_text()


def test_a_signal_reaches_every_child_nothing_new_starts_and_the_study_stops(tmp_path):
    children = Children([{}, {}])
    codes = {}

    def start(name):
        codes[name] = children.run([sys.executable, "-c", CHILD, str(tmp_path / f"{name}.stopped")],
                                   tmp_path / f"{name}.log")

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    with pytest.raises(Interrupted) as e, children.forwarding():
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while not all(ready(tmp_path / f"{n}.log") for n in "ab"):
            assert time.time() < deadline
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # to the study only, as `kill PID` does
        for t in threads:
            t.join(30)
        assert children.run([sys.executable, "-c", "print('late')"], tmp_path / "late.log") == -1
    assert e.value.exit_code == 143 and "the same command resumes them" in str(e.value)
    assert codes == {"a": 143, "b": 143}
    assert all((tmp_path / f"{n}.stopped").read_text() == "15" for n in "ab")
    assert not (tmp_path / "late.log").read_text()
    for n in "ab":  # the whole group got it: no grandchild left behind
        pid = int((tmp_path / f"{n}.log").read_text().split()[1])
        deadline = time.time() + 10
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            assert time.time() < deadline, "a grandchild outlived the stop"
            time.sleep(0.1)
