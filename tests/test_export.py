"""usi/evaluation/export.py: `usi export`: a folder timm loads without usi, ONNX, odd targets."""
import json
import os
import stat
import subprocess
import sys

import torch

from usi.training import checkpoint

from conftest import usi_main
from helpers import one_error, train_args


def test_export_gives_a_folder_timm_loads_without_usi_and_an_onnx_model(image_root, tmp_path):
    run = tmp_path / "run"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    out = usi_main("export", str(run / "last.pt"), str(tmp_path / "export"), "--onnx")
    assert out.returncode == 0, out.stderr
    code = (f"import timm, torch; m = timm.create_model('local-dir:{tmp_path / 'export'}', pretrained=True).eval(); "
            f"print(m.pretrained_cfg['crop_pct'], m.pretrained_cfg['input_size'], m.num_classes)")
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert alone.stdout.split() == ["0.95", "(3,", "16,", "16)", "4"], alone.stderr  # the student's eval settings
    report = json.loads((tmp_path / "export" / "usi-export.json").read_text())
    assert report["weights"] == "ema" and report["timm_max_abs_diff"] < 1e-5 and report["onnx_max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["label_names"] == sorted(p.name for p in (image_root / "train").iterdir())
    again = usi_main("export", str(run / "last.pt"), str(tmp_path / "export"))
    assert again.returncode == 2 and "not an empty folder" in again.stderr


def test_checkpoints_whose_weights_are_not_tensors_and_odd_export_targets_are_one_line(image_root, tmp_path):
    run = tmp_path / "r"
    assert usi_main(*train_args(image_root, run, "sched.epochs=1", "sched.warmup_epochs=0")).returncode == 0
    state = torch.load(run / "last.pt", weights_only=True)
    checkpoint.save({**{k: v for k, v in state.items() if k != "format"}, "student": {"w": [1, 2]}},
                    tmp_path / "odd.pt")
    one_error(usi_main("eval", str(tmp_path / "odd.pt"), f"data.root={image_root}"), "not a mapping of names")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    one_error(usi_main("export", str(run / "last.pt"), str(tmp_path / "dangling")), "is a link")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    assert usi_main("export", str(run / "last.pt"), str(mine)).returncode == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((mine / "model.safetensors").stat().st_mode) == 0o666 & ~umask
