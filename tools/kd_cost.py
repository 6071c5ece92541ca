"""What ensembles and feature KD cost per training step, against logit KD: medians, in one process.

Each configuration is built by usi's own `build_training` (the teachers folded, the projection in the
optimizer) and timed on the same batch through the engine's `forward_backward` + `optimizer_update`.
The configurations are timed round-robin, so drift of the machine falls on all alike. Memory: the
teachers' weights (exact), and on CUDA the peak allocated memory of a step.

    python tools/kd_cost.py --student resnet18 --teacher resnet50 --size 128 --batch 16 --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from usi import recipe as recipe_mod
from usi.data.synthetic import make_dataset
from usi.errors import UsageError, one_line
from usi.runtime import distributed
from usi.training import build
from usi.training.engine import forward_backward, optimizer_update, prepare_batch

CLASSES = 10


def configurations(teacher: str, files: list[Path], student_layer: str, teacher_layer: str) -> dict[str, list[str]]:
    one = [f"teacher.name={teacher}", f"teacher.weights={files[0]}"]
    extra = lambda n: ["teacher.extra=[" + ", ".join(  # noqa: E731
        f"{{name: {teacher}, weights: {f}}}" for f in files[1:n]) + "]"]
    feature = [f"features.student={student_layer}", f"features.teacher={teacher_layer}"]
    return {"no teacher": ["teacher.name=null"], "logit KD": one, "ensemble of 2": one + extra(2),
            "ensemble of 3": one + extra(3), "feature KD": one + feature, "ensemble of 3 + feature KD":
            one + extra(3) + feature}


def build_all(args, root: Path, files: list[Path]) -> dict:
    common = [f"model.name={args.student}", f"data.root={root}", f"data.input_size={args.size}",
              f"data.batch_size={args.batch}", f"optim.global_batch={args.batch}", "data.workers=0",
              f"run.device={args.device}", f"run.dir={root / 'unused'}", f"run.amp={args.amp}",
              f"run.channels_last={'true' if args.channels_last else 'false'}"]
    built = {}
    for name, overrides in configurations(args.teacher, files, args.student_layer, args.teacher_layer).items():
        recipe = recipe_mod.load(None, common + overrides)
        built[name] = build.build_training(recipe, distributed.Dist(device=torch.device(args.device)))
    return built


def step(t, x, y) -> None:
    batch_x, batch_y = prepare_batch(t.state, t.cfg, x, y)
    forward_backward(t.state, t.cfg, batch_x, batch_y, sync=True)
    optimizer_update(t.state, t.cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--student-layer", default="layer3")
    p.add_argument("--teacher-layer", default="layer3")
    p.add_argument("--size", type=positive, default=128)
    p.add_argument("--batch", type=positive, default=16, help="even (mixup pairs samples)")
    p.add_argument("--rounds", type=positive, default=7)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16" if torch.cuda.is_available() else "none")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU here")
    try:
        return measure(args)
    except UsageError as e:  # a bad model or module name, an odd batch: one line, as usi says it
        print(f"kd_cost: error: {one_line(e)}", file=sys.stderr)
        return 2


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def measure(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "data", train_per_class=4, val_per_class=1, size=args.size,
                            num_classes=CLASSES)
        files = []
        for i in range(3):
            torch.manual_seed(i)
            files.append(Path(tmp) / f"teacher{i}.safetensors")
            save_file(timm.create_model(args.teacher, num_classes=CLASSES).state_dict(), str(files[-1]))
        built = build_all(args, root, files)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
        y = torch.randint(0, CLASSES, (args.batch,), generator=g).to(args.device)
        times, peaks = {n: [] for n in built}, {n: 0 for n in built}
        for t in built.values():  # warm-up: first-call allocations, cuDNN autotuning
            step(t, x, y)
        for _ in range(args.rounds):
            for name, t in built.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                step(t, x, y)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["logit KD"])
    print(f"student {args.student}, teachers {args.teacher}, {args.size} px, batch {args.batch}, {args.device}, "
          f"amp {args.amp}, median of {args.rounds} round-robin steps\n")
    print("| configuration | step (ms) | / logit KD | teacher weights (MB) | extra trained params | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for name, t in built.items():
        teacher = t.state.teacher
        weights = sum(q.numel() * q.element_size() for q in teacher.parameters()) / 2**20 if teacher else 0.0
        extra = sum(q.numel() for q in t.state.projector.parameters()) if t.state.projector is not None else 0
        median = statistics.median(times[name])
        peak = f"{peaks[name]:.0f}" if args.device == "cuda" else "n/a (CPU)"
        print(f"| {name} | {median * 1e3:.0f} | {median / base:.2f} | {weights:.1f} | {extra} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
