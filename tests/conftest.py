"""Shared fixtures: small generated image folders and a helper that runs the real `usi` command."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# No test reaches a model hub (this machine has none to reach): fail at once instead of after network
# timeouts. Set before timm (and huggingface_hub) are imported; subprocesses inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from usi.data.synthetic import make_dataset  # noqa: E402

# Runs in this process (usi_main) compute as the subprocesses do (OMP_NUM_THREADS=1): one thread, so both
# give the same bits (a different thread count reorders float sums).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# A recipe small enough for a 2-core CPU: 4 classes, 16 px, a few steps per epoch.
TINY = [
    "model.name=test_resnet", "teacher.name=null", "data.input_size=16", "data.batch_size=8",
    "data.eval_batch_size=8", "data.workers=0", "optim.global_batch=8", "sched.epochs=2",
    "sched.warmup_epochs=1", "ema.decay=0.9", "run.amp=none", "run.channels_last=false", "run.log_interval=2",
    "run.device=cpu",
]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Teacher-logit caches go to a temporary folder, never the user's ~/.cache (subprocesses inherit it)."""
    os.environ["USI_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """4 classes x 16 train / 3 val images."""
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=16, val_per_class=3, size=20,
                        num_classes=4)


@pytest.fixture(scope="session")
def odd_root(tmp_path_factory) -> Path:
    """5 classes, 3 val images each: 15 val images, not divisible by 2 ranks."""
    return make_dataset(tmp_path_factory.mktemp("odd"), train_per_class=8, val_per_class=3, size=20,
                        num_classes=5)


def usi_cmd(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run `python -m usi ...` (or under torchrun with `torchrun` processes) and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "usi", *args]
    else:
        cmd = [sys.executable, "-m", "usi", *args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def usi_main(*args: str, env: dict | None = None) -> SimpleNamespace:
    """Run `usi ...` in this process: no interpreter start-up, for commands that fail before training
    (or only evaluate). Returns what usi_cmd returns: returncode, stdout, stderr."""
    from usi.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Payload:
    """Unpickling this runs `touch $USI_PWNED`: the hostile-file tests prove it never runs."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['USI_PWNED']}",))


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: soft colour blobs, a texture, noise, and a dark and a bright corner."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.full((height, width, 3), 110.0 + 30 * seed)
    for _ in range(10):
        cx, cy = rng.random(2)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (0.05 + 0.25 * rng.random()) ** 2))[..., None]
        img = img * (1 - weight) + rng.random(3) * 255 * weight
    img += 15 * np.sin(50 * x + 30 * y)[..., None] + rng.normal(0, 4, img.shape)
    img[:6, :6] -= 90 * (seed % 2)
    img[-6:, -6:] += 90 * (seed % 3 == 0)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Photo-like RGB arrays for the RandAugment tests."""
    return [photo(72, 56, seed) for seed in range(6)]  # not square: width and height must not be swapped


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is faster, and far faster on a machine whose cores are busy elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
