"""One command, one markdown report of what usi does on this machine's accelerator (or CPU).

  python tools/gpu_report.py --out gpu-report.md --photos /tmp/in1k-val --imagenette /data/imagenette
  python tools/gpu_report.py --small --out report.md          # CPU-sized: what CI runs

On whatever device it finds (CUDA if any), it measures, each figure a median of round-robin runs:
  1. per student (resnet50, mobilenetv3_large_100, vit_small_patch16_224; teacher tresnet_v2_l; random
     weights, 1000 classes) at batch 256 when it fits, else 128, bf16 and channels_last on CUDA: the
     student's step, the teacher's forward (timm's eager DistillationTeacher, usi's BN-folded teacher, and
     folded + compiled), usi's KD step and timm's LogitDistillationTask step, and the KD step's MFU
     (FLOPs of student forward x 3 + teacher forward, counted by torch, over the device's peak);
  2. device-side RandAugment (usi.data.device_augment) per batch;
  3. the training loader at this machine's core count on full-size photos (--photos), today's path and
     the new one, against the KD step's images/s: does the loader keep the device busy?
  4. a short end-to-end `usi train` (one process; NCCL is not needed for one) on imagenette (--imagenette:
     a folder with train/ and val/), teacher tresnet_v2_l with random weights written to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import throughput
import timm
import torch
from loader_bench import layout, rate
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from usi.data.device_augment import DeviceRandAugment
from usi.data.folder import FolderSplit
from usi.data.loader import InputSpec, train_transform
from usi.recipe import AugSection
from usi.runtime.environment import versions

# Dense bf16 peaks (no sparsity), for MFU. A name not listed reports no MFU rather than a guess.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
FULL = SimpleNamespace(models=["resnet50", "mobilenetv3_large_100", "vit_small_patch16_224"], teacher="tresnet_v2_l",
                       batches=[256, 128], input_size=None, classes=1000, warmup=5, runs=20, train_steps=60)
SMALL = SimpleNamespace(models=["test_resnet", "test_efficientnet", "test_vit"], teacher="test_resnet", batches=[8],
                        input_size=32, classes=10, warmup=2, runs=5, train_steps=4)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def forward_flops(name: str, classes: int, size: int) -> float:
    """FLOPs of one image's forward pass, counted by torch (a multiply-add is 2)."""
    model = timm.create_model(name, num_classes=classes).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def step_rows(cfg, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for model in cfg.models:
        for batch in cfg.batches:  # the largest batch that fits
            args = SimpleNamespace(teacher=cfg.teacher, batch=batch, input_size=cfg.input_size, classes=cfg.classes,
                                   amp="bf16" if cuda else "none", channels_last=cuda, compile=False,
                                   teacher_compile=True, warmup=cfg.warmup, runs=cfg.runs)
            try:
                row = throughput.measure(model, args, device)
                break
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        else:
            rows.append({"model": model, "error": "out of memory at every batch size"})
            continue
        size = row["input_size"]
        flops = 3 * forward_flops(model, cfg.classes, size) + forward_flops(cfg.teacher, cfg.classes, size)
        peak = peak_flops(device)
        row["tflops_per_step"] = flops * row["batch"] / 1e12
        row["mfu"] = flops * row["batch"] / (row["kd_ms"] / 1000) / peak if peak else None
        row["teacher_compiled_speedup"] = row["timm_teacher_ms"] / row["teacher_compiled_ms"]
        rows.append(row)
    return rows


def randaugment_row(cfg, device: torch.device) -> dict:
    size, batch = cfg.input_size or 224, cfg.batches[-1] if device.type == "cpu" else 128
    augment = DeviceRandAugment("rand-m7-mstd0.5-inc1", img_size=size, mean=(0.485, 0.456, 0.406))
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device).float()
    generator, times = torch.Generator().manual_seed(0), []
    for i in range(cfg.warmup + cfg.runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        augment(x, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    return {"batch": batch, "input_size": size, "ms_per_batch": ms, "img_per_s": batch / ms * 1000}


def loader_row(photos: Path, cfg) -> dict:
    """Both training paths at this machine's core count (one worker per core)."""
    workers, spec, aug = os.cpu_count() or 1, InputSpec(cfg.input_size or 224, (0.485, 0.456, 0.406),
                                                        (0.229, 0.224, 0.225)), AugSection()
    with tempfile.TemporaryDirectory() as tmp:
        split = FolderSplit(layout(photos, Path(tmp), copies=max(1, 4 * workers * 32 // 334 + 1)))
        today = rate(split.dataset(train_transform(aug, spec, on_device=False)), workers, 32)
        new = rate(split.dataset(train_transform(aug, spec, on_device=True)), workers, 32)
    return {"workers": workers, "today_img_per_s": today, "new_img_per_s": new, "images": len(split)}


def train_row(root: Path | None, cfg, device: torch.device) -> dict:
    """`usi train` for a few steps: the KD run's own images/s (its metrics.jsonl), start to finish."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if root is None:  # CPU-sized: the quickstart's generated data
            from usi.data.synthetic import make_dataset
            root = make_dataset(tmp / "data", train_per_class=32, val_per_class=4, size=32)
        classes = len([p for p in (root / "train").iterdir() if p.is_dir()])
        weights = tmp / "teacher.safetensors"  # random weights: the cost is the same as a trained teacher's
        save_file(timm.create_model(cfg.teacher, num_classes=classes).state_dict(), str(weights))
        model = cfg.models[0]
        args = ["train", "usi", f"model.name={model}", f"teacher.name={cfg.teacher}", f"teacher.weights={weights}",
                f"data.root={root}", f"run.dir={tmp / 'run'}", "sched.epochs=1", "sched.warmup_epochs=0",
                f"run.max_steps={cfg.train_steps}", f"data.workers={os.cpu_count() or 1}", "ema.decay=0.99",
                f"run.log_interval={max(1, cfg.train_steps // 4)}"]
        if device.type == "cpu":
            args += [f"data.input_size={cfg.input_size}", f"data.batch_size={cfg.batches[0]}",
                     f"optim.global_batch={cfg.batches[0]}", "run.device=cpu"]
        else:
            args += ["data.batch_size=128", "optim.global_batch=128"]
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "usi", *args], cwd=repo, capture_output=True, text=True)
        wall = time.time() - t0
        if out.returncode != 0:
            return {"model": model, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
        (record,) = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        return {"model": model, "steps": cfg.train_steps, "img_per_s": record["train"]["img_per_s"],
                "train_s": record["train"]["time_s"], "wall_s": wall, "task_loss": record["train"]["task_loss"]}


def cell(value, digits=1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(device, rows, augment, loader, run) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    v = versions()
    lines = [f"# usi GPU report: {name}", "",
             f"torch {v['torch']}, timm {v['timm']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, usi {v['usi']} ({v['git']})",
             "", "## Training step, teacher forward, MFU", ""]
    if rows and "amp" in rows[0]:
        lines.append(f"{rows[0]['amp']}, channels_last {rows[0]['channels_last']}, teacher {rows[0]['teacher']}, "
                     f"medians in ms")
    lines += ["", "| student | batch | student step | teacher: timm eager | usi folded | usi folded+compiled | "
                  "KD step | timm task step | KD / (student+teacher) | KD / timm task | usi teacher speed-up "
                  "(eager, compiled) | KD img/s | MFU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['error']} |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['model']} | {r['batch']} | {cell(r['student_ms'])} | {cell(r['timm_teacher_ms'])} | "
                     f"{cell(r['teacher_ms'])} | {cell(r['teacher_compiled_ms'])} | {cell(r['kd_ms'])} | "
                     f"{cell(r['timm_task_ms'])} | {r['overhead']:.3f} | {r['vs_timm_task']:.3f} | "
                     f"{r['teacher_speedup']:.2f}x, {r['teacher_compiled_speedup']:.2f}x | {r['kd_img_per_s']:.0f} | "
                     f"{mfu} |")
    lines += ["", "## RandAugment on the device", "",
              f"rand-m7-mstd0.5-inc1 on a {augment['batch']} x 3 x {augment['input_size']}^2 batch: "
              f"{augment['ms_per_batch']:.1f} ms ({augment['img_per_s']:.0f} images/s)", ""]
    lines += ["## Loader", ""]
    if loader is None:
        lines.append("not measured (pass --photos with full-size photos)")
    else:
        kd = next((r["kd_img_per_s"] for r in rows if "kd_img_per_s" in r), None)
        keeps = "yes" if kd and loader["new_img_per_s"] >= kd else "no"
        lines.append(f"{loader['workers']} workers, {loader['images']} image reads: today's path "
                     f"{loader['today_img_per_s']:.0f} images/s, new path {loader['new_img_per_s']:.0f} images/s "
                     f"({loader['new_img_per_s'] / loader['today_img_per_s']:.2f}x); {rows[0]['model']}'s KD step "
                     f"takes {kd or 0:.0f} images/s: the new loader keeps it busy: {keeps}")
    lines += ["", "## End-to-end usi train", ""]
    if "error" in run:
        lines.append(f"{run['model']}: failed: {run['error']}")
    else:
        lines.append(f"{run['model']} with teacher, {run['steps']} steps: {run['img_per_s']:.0f} images/s "
                     f"(median of logging intervals), task loss {run['task_loss']:.3f}, {run['wall_s']:.0f} s "
                     f"wall including start-up")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-report.md"))
    p.add_argument("--small", action="store_true", help="CPU-sized models and batches (what CI runs)")
    p.add_argument("--photos", type=Path, help="full-size photos for the loader figure")
    p.add_argument("--imagenette", type=Path, help="a folder with train/ and val/ for the end-to-end run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = SMALL if args.small else FULL
    rows = step_rows(cfg, device)
    augment = randaugment_row(cfg, device)
    loader = loader_row(args.photos, cfg) if args.photos else None
    run = train_row(args.imagenette, cfg, device)
    report = markdown(device, rows, augment, loader, run)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps({"steps": rows, "randaugment": augment, "loader": loader,
                                                         "train": run}, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
