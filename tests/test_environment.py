"""usi/runtime/environment.py: versions recorded with a run, cuDNN / TF32 switches, the CPU reproduction key."""
import json

import pytest
import torch
from safetensors import safe_open

from usi import recipe as R
from usi.runtime.environment import reproduction_key, set_backend_flags, versions
from usi.training import checkpoint

from conftest import usi_main
from helpers import train_args


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


@pytest.fixture
def backend_flags():
    """torch's global cuDNN/TF32 flags, restored by assignment through torch's own setters afterwards
    (monkeypatch's undo would delattr them: cuBLASModule has no instance attribute to delete)."""
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in flags]
    yield
    for owner, name, value in saved:
        setattr(owner, name, value)


def test_cudnn_benchmark_and_tf32_are_a_recipe_choice(backend_flags):
    set_backend_flags(R.load(None).run, torch.device("cuda"))
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32
    set_backend_flags(R.load(None, ["run.cudnn_benchmark=false", "run.tf32=false"]).run, torch.device("cuda"))
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32


def test_the_reproduction_key_names_the_cpu_kernels_and_every_computing_package():
    import numpy
    import PIL
    import simplejpeg
    import timm

    key = reproduction_key()
    assert "\n" not in key and key.startswith(f"CPU kernels {torch.backends.cpu.get_cpu_capability()}, ")
    for name, module in (("torch", torch), ("timm", timm), ("numpy", numpy), ("Pillow", PIL),
                         ("simplejpeg", simplejpeg)):
        assert f"{name} {module.__version__}" in key, name


def test_versions_name_the_libraries_of_this_process():
    import timm

    import usi
    now = versions()
    assert now["usi"] == usi.__version__ and now["torch"] == torch.__version__ and now["timm"] == timm.__version__
    assert type(now["torch"]) is str  # a TorchVersion would not survive a weights_only load
