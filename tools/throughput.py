"""What distillation costs, measured: student step, teacher forward, KD step, and timm's task step.

On synthetic input, per student model, in one process (so the ratios compare like with like):
  student      usi's training step without a teacher (mixup, forward, backward, fused AdamW)
  teacher      usi's teacher forward (BN folded, channels_last / compile when asked, autocast)
  kd           usi's full distillation step (teacher + student on the same mixed batch)
  timm_task    timm.task.LogitDistillationTask's step on the same student, teacher, batch and dtype
  timm_teacher timm's DistillationTeacher forward (eager, unfolded) on the same batch

Reports medians of --runs timings after --warmup, and the ratios
  overhead      = kd / (student + teacher)          goal <= 1.05
  vs_timm_task  = kd / timm_task                    goal <= 1.0
  teacher_speedup = timm_teacher / teacher          goal >= 1.3 on GPU

  python tools/throughput.py --models resnet50 mobilenetv3_large_100 --teacher tresnet_v2_l --batch 128 \\
      --device cuda --amp bf16 --channels-last
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import timm.loss
import timm.optim
import torch
from timm.data import Mixup, resolve_model_data_config
from timm.task import DistillationTeacher, LogitDistillationTask

from usi.distill.loss import DistillLoss
from usi.distill.teacher import Teacher, fold_batchnorm
from usi.models import Compute
from usi.training.engine import StepConfig, TrainState, forward_backward, optimizer_update, prepare_batch


def interleaved_medians(fns: dict, warmup: int, runs: int, device: torch.device) -> dict[str, float]:
    """Median ms of each callable, timed round-robin so that drift of the machine (clocks, caches,
    other load) falls on every candidate alike rather than on whichever ran last."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def build(student_name, teacher_name, args, device):
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp) if device.type == "cuda" else None
    student = timm.create_model(student_name, num_classes=args.classes).to(device)
    teacher_model = timm.create_model(teacher_name, num_classes=args.classes).eval().to(device)
    size = args.input_size or resolve_model_data_config(student)["input_size"][-1]
    s_cfg, t_cfg = resolve_model_data_config(student), resolve_model_data_config(teacher_model)
    folded, n = fold_batchnorm(copy.deepcopy(teacher_model).cpu(), torch.randn(2, 3, size, size))
    folded = folded.to(device)
    if args.channels_last:
        student.to(memory_format=torch.channels_last)
        folded.to(memory_format=torch.channels_last)
    usi_teacher = Teacher(folded, student_mean=s_cfg["mean"], student_std=s_cfg["std"], teacher_mean=t_cfg["mean"],
                          teacher_std=t_cfg["std"]).to(device)
    if args.compile:
        usi_teacher.compile()
    return student, teacher_model, usi_teacher, size, amp, n


def step_for(student, teacher, *, amp, args, device) -> tuple[TrainState, StepConfig]:
    opt = timm.optim.create_optimizer_v2(student, "adamw", lr=1e-4, weight_decay=0.02, fused=True)
    sched = type("NoSched", (), {"step_update": lambda self, num_updates: None})()
    state = TrainState(student=student, wrapped=torch.compile(student) if args.compile else student, optimizer=opt,
                       scheduler=sched, teacher=teacher,
                       mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=args.classes, label_smoothing=0))
    cfg = StepConfig(compute=Compute(device, amp, args.channels_last), num_classes=args.classes, loss=DistillLoss())
    return state, cfg


def usi_step(step, x, y):
    state, cfg = step
    xm, ym = prepare_batch(state, cfg, x, y)
    forward_backward(state, cfg, xm, ym, sync=True)
    optimizer_update(state, cfg)


def measure(student_name, args, device) -> dict:
    student, teacher_model, usi_teacher, size, amp, folded = build(student_name, args.teacher, args, device)
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    xt = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    out = {"model": student_name, "teacher": args.teacher, "batch": args.batch, "input_size": size,
           "device": str(device), "amp": args.amp if amp else "fp32", "channels_last": args.channels_last,
           "compile": args.compile, "teacher_bn_folded": folded}
    alone = step_for(student, None, amp=amp, args=args, device=device)
    kd = step_for(student, usi_teacher, amp=amp, args=args, device=device)

    def teacher_fwd(model):
        with ctx(), torch.no_grad():
            model(xt)

    # timm's own task on the same student (a fresh copy of its weights), teacher and batch
    timm_teacher = DistillationTeacher(copy.deepcopy(teacher_model), device=device)
    timm_student = copy.deepcopy(student)
    task = LogitDistillationTask(timm_student, timm_teacher, criterion=timm.loss.SoftTargetCrossEntropy(),
                                 distill_loss_weight=5.0, task_loss_weight=1.0, temperature=1.0,
                                 device=device, verbose=False)
    timm_opt = timm.optim.create_optimizer_v2(timm_student, "adamw", lr=1e-4, weight_decay=0.02, fused=True)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=args.classes, label_smoothing=0)

    def timm_step():
        xm, ym = mixup(x, y)
        if args.channels_last:
            xm = xm.contiguous(memory_format=torch.channels_last)
        if amp:
            with torch.autocast(device.type, dtype=amp):
                loss = task(xm, ym)["loss"]
        else:
            loss = task(xm, ym)["loss"]
        loss.backward()
        timm_opt.step()
        timm_opt.zero_grad(set_to_none=True)

    task.train()
    candidates = {
        "student": lambda: usi_step(alone, x, y), "teacher": lambda: teacher_fwd(usi_teacher),
        "kd": lambda: usi_step(kd, x, y), "timm_task": timm_step, "timm_teacher": lambda: teacher_fwd(timm_teacher),
    }
    if getattr(args, "teacher_compile", False):  # the folded teacher compiled too (a copy: the others stay eager)
        compiled = copy.deepcopy(usi_teacher).compile()
        candidates["teacher_compiled"] = lambda: teacher_fwd(compiled)
    out.update({f"{k}_ms": v for k, v in interleaved_medians(candidates, args.warmup, args.runs, device).items()})
    out["overhead"] = out["kd_ms"] / (out["student_ms"] + out["teacher_ms"])
    out["vs_timm_task"] = out["kd_ms"] / out["timm_task_ms"]
    out["teacher_speedup"] = out["timm_teacher_ms"] / out["teacher_ms"]
    out["kd_img_per_s"] = args.batch / out["kd_ms"] * 1000
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv3_large_100"])
    p.add_argument("--teacher", default="tresnet_v2_l")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input-size", type=int, default=None, help="default: the student's own")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--teacher-compile", action="store_true", help="also time the folded teacher compiled")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(m, args, device) for m in args.models]
    cols = ["model", "student_ms", "teacher_ms", "kd_ms", "timm_task_ms", "timm_teacher_ms", "overhead",
            "vs_timm_task", "teacher_speedup", "kd_img_per_s"]
    print(f"device {device}, {rows[0]['amp']}, batch {args.batch}, teacher {args.teacher}, "
          f"channels_last {args.channels_last}, compile {args.compile}; medians of {args.runs} after {args.warmup}")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
