"""Helpers that tests in several files use: the tiny training command, one-line error checks, teacher files,
process trees."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import REPO, TINY, read_jsonl, usi_cmd, usi_main


def train_args(root, run_dir, *extra):
    return ["train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra]


def one_error(out, message):
    """Exit 2, exactly one `usi: error:` line containing `message`, no traceback."""
    lines = [x for x in out.stderr.splitlines() if x.startswith("usi: error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def strict_json(text: str):
    """Python's json accepts bare NaN; real JSON does not."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def nan_copy(state: dict) -> dict:
    """The weights of a diverged run: every floating-point tensor NaN."""
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}


def teacher_file(path, classes=4, name="test_resnet"):
    save_file(timm.create_model(name, num_classes=classes).state_dict(), str(path))
    return path


def teacher_files(tmp_path, names=("test_resnet", "test_efficientnet", "test_resnet")):
    paths = []
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        path = tmp_path / f"teacher{i}.safetensors"
        save_file(timm.create_model(name, num_classes=4).state_dict(), str(path))
        paths.append(path)
    return paths


def ensemble_args(paths, names=("test_resnet", "test_efficientnet", "test_resnet")):
    members = ", ".join(f"{{name: {n}, weights: {p}{', input_size: 24' if i == 1 else ''}}}"
                        for i, (n, p) in enumerate(zip(names[1:], paths[1:]), start=1))
    return [f"teacher.name={names[0]}", f"teacher.weights={paths[0]}", f"teacher.extra=[{members}]"]


def train(root, run_dir, *extra, torchrun=0, process=False):
    """In this process (fast) unless under torchrun or asked for a process of its own."""
    args = ("train", "quickstart", *TINY, f"data.root={root}", f"run.dir={run_dir}", *extra)
    return usi_cmd(*args, torchrun=torchrun) if torchrun or process else usi_main(*args)


def start(args, torchrun=0, max_restarts=0):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "usi"]
    if torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                  f"--max-restarts={max_restarts}", "-m", "usi"]
    return subprocess.Popen(prefix + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_epochs(run_dir: Path, n: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and len(read_jsonl(path)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


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


def run_tool(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


# RandAugment on the device (test_augment_ops.py, test_device_augment.py)
FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


def as_batch(arrays) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]).float()


class Spy(torch.nn.Module):
    """A tiny classifier that keeps every input it saw (poison: its logits are NaN)."""
    def __init__(self, classes=4, poison=False):
        super().__init__()
        self.fc = torch.nn.Linear(3, classes)
        self.inputs, self.poison = [], poison

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        out = self.fc(x.mean((2, 3)))
        return out * float("nan") if self.poison else out



def soft_label_store(root, out, teacher, *extra, flags=("--steps-per-chunk", "3")):
    """`usi soft-labels` on the tiny recipe (teacher: its teacher.* overrides)."""
    return usi_main("soft-labels", "quickstart", *TINY, f"data.root={root}", *teacher, *extra, "--out", str(out),
                    *flags)


DATA_CLASSES = ["circle", "frame", "ring", "square"]  # image_root's classes, in label order


def usi_weights(path, classes, form="best.safetensors", name="test_resnet"):
    """Weights that carry their class list, as usi writes them: a run's best.safetensors (metadata), its
    last.pt (`classes`), or an export folder (config.json's label_names); returns the weights file."""
    state = timm.create_model(name, num_classes=len(classes)).state_dict()
    if form == "best.safetensors":
        save_file(state, str(path), metadata={"classes": json.dumps(classes), "recipe": "model: {}"})
    elif form == "last.pt":
        torch.save({"format": 1, "student": state, "classes": classes, "recipe": "model: {}"}, path)
    else:
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architecture": name, "label_names": classes}))
        (path / "usi-export.json").write_text("{}")
        path = path / "model.safetensors"
        save_file(state, str(path))
    return path
