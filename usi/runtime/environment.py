"""What a run ran on: library versions and the git revision (recorded with every run and checkpoint),
and the GPU backend switches a recipe chooses (cuDNN autotuning, TF32)."""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import timm
import torch

import usi

log = logging.getLogger("usi")


def versions() -> dict[str, str | None]:
    """usi, torch, timm, CUDA and cuDNN versions, and the git revision when usi runs from a checkout."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    # plain str: torch.__version__ is a TorchVersion, which a weights_only load refuses
    return {"usi": usi.__version__, "torch": str(torch.__version__), "timm": str(timm.__version__),
            "cuda": str(torch.version.cuda) if torch.version.cuda else None, "cudnn": str(cudnn) if cudnn else None,
            "git": git_revision()}


def git_revision() -> str | None:
    """The checkout's commit (+dirty when it has local changes), or None outside a git checkout."""
    top = Path(usi.__file__).resolve().parent.parent
    if not (top / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(top), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def warn_if_versions_differ(saved: dict | None, now: dict, what: str) -> None:
    """One line when a checkpoint was written by another torch or timm (results may then differ)."""
    if not saved:
        return
    changed = [f"{k} {saved.get(k)} -> {now.get(k)}" for k in ("torch", "timm") if saved.get(k) != now.get(k)]
    if changed:
        log.warning(f"{what} was written under other versions ({', '.join(changed)}); resuming anyway")


def set_backend_flags(run_cfg, device: torch.device) -> None:
    """cuDNN autotuning and TF32, as timm's train.py sets them; a recipe may turn them off for
    bit-exact GPU runs. No effect on CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = run_cfg.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = run_cfg.tf32
    torch.backends.cudnn.allow_tf32 = run_cfg.tf32


def reproduction_key() -> str:
    """What a CPU result's last digits depend on, in one line: the SIMD kernels torch dispatches to (AVX-512
    and AVX2 round float sums differently; measured: the quickstart's teacher moves 6.6 points between them
    on the same data) and the versions of the packages that compute or decode."""
    import numpy
    import PIL
    import simplejpeg

    return (f"CPU kernels {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"numpy {numpy.__version__}, Pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}")

