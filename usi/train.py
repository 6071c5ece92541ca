"""`usi train`: recipe -> built objects -> resume -> the epoch loop -> summary.

Reads top to bottom: `train` plans the run directory (usi/rundir.py), `build` makes every object
from the recipe (usi/build.py, usi/data), `run` resumes and loops over epochs in named phases.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from usi import build as make
from usi import checkpoint, data, distributed, rundir
from usi.data.loader import seed_everything
from usi.engine import Guard, NonFiniteError, Position, StepConfig, TrainState, due, evaluate, train_one_epoch
from usi.errors import UsageError
from usi.logit_cache import teacher_val_logits
from usi.metrics import best_of, better
from usi.progress import Progress, setup_logging
from usi.recipe import Recipe

log = logging.getLogger("usi")


@dataclass
class Training:
    """Everything a run holds once built."""
    recipe: Recipe
    dist: distributed.Dist
    run_dir: Path
    state: TrainState
    cfg: StepConfig
    train_split: data.Split
    val_split: data.Split
    train_loader: object
    val_loader: object
    steps: int  # per epoch
    epochs: int  # including cool-down
    params: int

    @property
    def classes(self) -> list[str]:
        return self.train_split.classes


def train(recipe: Recipe) -> dict:
    dist = distributed.setup(recipe.run.device)
    try:
        setup_logging(None, dist.main)
        run_dir, resume_from = rundir.plan(recipe)
        training = build(recipe, dist, run_dir)
        rundir.create(recipe, run_dir, dist)
        setup_logging(run_dir, dist.main)
        return run(training, resume_from)
    finally:
        distributed.cleanup()


# ---------------------------------------------------------------- build


def build(recipe: Recipe, dist: distributed.Dist, run_dir: Path) -> Training:
    accum, lr, plan = make.batch_plan(recipe, dist.world)  # the world size is known: fail before any work
    train_split, val_split = data.open_splits(recipe.data)
    num_classes = len(train_split.classes)
    seed_everything(recipe.run.seed)
    student = make.create_student(recipe.model, num_classes, recipe.data.input_size)
    spec = make.input_spec(student, recipe.data.input_size)
    compute = make.compute_for(recipe, dist.device)
    teacher = make.teacher_for(recipe, num_classes, spec, compute)
    make.place(student, compute)

    train_loader = data.train_loader(train_split, recipe.data, recipe.aug, spec, seed=recipe.run.seed, dist=dist)
    val_loader = data.val_loader(val_split, recipe.data, recipe.aug, spec, dist=dist)
    steps = train_loader.steps_per_epoch()
    if recipe.run.max_steps:
        steps = min(steps, recipe.run.max_steps)
    if steps == 0:
        raise UsageError(f"data.batch_size={recipe.data.batch_size} x {dist.world} processes is larger than one "
                         f"epoch of {len(train_split)} training samples")

    log.info(plan)
    if steps % accum:
        log.warning(f"{steps} steps per epoch is not a multiple of {accum} accumulation steps; "
                    f"the last {steps % accum} steps of each epoch carry gradient into the next")
    optimizer = make.create_optimizer(recipe, student, lr)
    scheduler, epochs = make.create_scheduler(recipe, optimizer, steps // accum)
    ema = make.create_ema(recipe, student)
    wrapped = student
    if dist.distributed:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        wrapped = DistributedDataParallel(student, device_ids=device_ids)
    if recipe.run.compile:
        wrapped = torch.compile(wrapped)
        if teacher is not None:
            teacher.compile()
    state = TrainState(student=student, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, teacher=teacher,
                       ema=ema, scaler=make.grad_scaler(compute), mixup=make.create_mixup(recipe, num_classes))
    params = sum(p.numel() for p in student.parameters())
    log.info(f"student {recipe.model.name}: {params / 1e6:.2f}M params, input {spec.size}, {num_classes} classes, "
             f"{len(train_split)} train / {len(val_split)} val images, {steps} steps x {epochs} epochs"
             + (f", teacher {recipe.teacher.name}" if teacher is not None else ", no teacher"))
    return Training(recipe=recipe, dist=dist, run_dir=run_dir, state=state,
                    cfg=make.step_config(recipe, compute, num_classes, accum), train_split=train_split,
                    val_split=val_split, train_loader=train_loader, val_loader=val_loader, steps=steps, epochs=epochs,
                    params=params)


# ---------------------------------------------------------------- run


def run(t: Training, resume_from: Path | None) -> dict:
    recipe, dist = t.recipe, t.dist
    # ---- resume: the checkpoint's position is all the state there is (randomness derives from it)
    at, best = Position(epoch=0, step=0, updates=0), {}
    if resume_from is not None:
        saved = checkpoint.restore(t.state, resume_from)
        at, best = Position(saved["epoch"], saved["step"], saved["num_updates"]), saved["best"]
        log.info(f"resumed from {resume_from}: epoch {at.epoch + 1}, step {at.step}")
        finished = rundir.read_summary(t.run_dir)
        if at.epoch >= t.epochs and finished is not None:
            log.info(f"{t.run_dir} already finished all {t.epochs} epochs; nothing to do")
            return finished
        if dist.main:
            rundir.keep_metrics_until(t.run_dir, at.epoch)
    start = time.time()
    teacher_metrics, teacher_logits = val_teacher(t)
    guard = Guard(dist.device, recipe.run.max_nonfinite)
    progress = Progress(dist.main)
    last_metrics, train_stats = {}, {}
    stop_at = min(t.epochs, at.epoch + recipe.run.stop_after) if recipe.run.stop_after else t.epochs
    while at.epoch < stop_at:
        # ---- train one epoch (from a mid-epoch step when resuming)
        t0 = time.time()
        try:
            train_stats, updates = train_one_epoch(
                t.state, t.cfg, t.train_loader.epoch(at.epoch, at.step), start=at, steps=t.steps, epochs=t.epochs,
                guard=guard, progress=progress, log_interval=recipe.run.log_interval,
                images_per_step=recipe.data.batch_size * dist.world, on_update=partial(mid_epoch_checkpoint, t, best))
        except NonFiniteError as e:
            last = t.run_dir / checkpoint.LAST
            raise NonFiniteError(f"{e}; last good checkpoint: {last if last.is_file() else 'none yet'}") from None
        record = {"epoch": at.epoch + 1, "train": {**train_stats, "bad_images": bad_images(t),
                                                   "time_s": time.time() - t0}}
        if record["train"]["bad_images"] > recipe.data.max_bad_samples:
            raise UsageError(f"{record['train']['bad_images']} unreadable images so far exceeds "
                             f"data.max_bad_samples={recipe.data.max_bad_samples}; see the warnings above for "
                             f"their paths")
        # ---- evaluate raw and EMA weights; export the best
        if due(at.epoch + 1, recipe.run.eval_every, last=t.epochs):
            t_eval = time.time()
            last_metrics, _ = evaluate(models_to_eval(t.state), t.val_loader, t.cfg.compute,
                                       n_bins=recipe.run.ece_bins, teacher_logits=teacher_logits)
            record["eval_time_s"] = time.time() - t_eval
            best = export_if_best(t, last_metrics, at.epoch, best)
            record.update(last_metrics)
        # ---- checkpoint at the epoch's end, then log
        at = Position(at.epoch + 1, 0, updates)
        if dist.main:
            rundir.append_metrics(t.run_dir, record)
            save(t, at, best)
            log.info(epoch_line(record))
    if at.epoch < t.epochs:
        log.info(f"stopped after epoch {at.epoch} (run.stop_after={recipe.run.stop_after}); "
                 f"continue with run.resume=auto")
        return {"stopped_at_epoch": at.epoch}
    # ---- summary
    summary = {
        "model": recipe.model.name, "teacher": recipe.teacher.name if recipe.kd else None,
        "params": t.params, "epochs": t.epochs, "num_classes": len(t.classes),
        "best": best, "final": last_metrics, "teacher_metrics": teacher_metrics,
        "train_img_per_s": train_stats.get("img_per_s"), "wall_time_s": time.time() - start,
    }
    if dist.main:
        rundir.write_summary(t.run_dir, summary)
        log.info(f"done: best {best.get('metric')} {best.get('value', float('nan')):.2f} "
                 f"({best.get('weights')} weights, epoch {best.get('epoch')}) -> {t.run_dir}")
    return summary


def val_teacher(t: Training) -> tuple[dict, torch.Tensor | None]:
    """The teacher's val metrics, once; this rank's logits serve every epoch's fidelity metrics."""
    if t.state.teacher is None:
        return {}, None
    t0 = time.time()
    metrics, logits, hit = teacher_val_logits(t.state.teacher, t.recipe.teacher, t.val_split, t.val_loader,
                                              compute=t.cfg.compute, n_bins=t.recipe.run.ece_bins, dist=t.dist)
    log.info(f"teacher val top-1 {metrics['top1']:.2f} "
             f"({'cached' if hit else 'computed and cached'}, {time.time() - t0:.1f} s)")
    return metrics, logits


def models_to_eval(state: TrainState) -> dict:
    return {"raw": state.student} | ({"ema": state.ema.module} if state.ema is not None else {})


def save(t: Training, at: Position, best: dict) -> None:
    checkpoint.save(checkpoint.capture(t.state, recipe_yaml=t.recipe.to_yaml(), classes=t.classes, at=at, best=best),
                    t.run_dir / checkpoint.LAST)


def mid_epoch_checkpoint(t: Training, best: dict, at: Position) -> None:
    """After an update: a checkpoint every run.ckpt_every_steps updates, except at the epoch's end."""
    if due(at.updates, t.recipe.run.ckpt_every_steps) and at.step < t.steps and t.dist.main:
        save(t, at, best)


def export_if_best(t: Training, metrics: dict, epoch: int, best: dict) -> dict:
    """Rank raw and EMA by run.best_metric; export the winner's weights if it beats the best so far."""
    metric = t.recipe.run.best_metric
    candidates = {name: m[metric] for name, m in metrics.items() if metric in m}
    if not candidates:
        return best
    name = best_of(candidates, metric)
    if not better(metric, candidates[name], best.get("value")):
        return best
    model = models_to_eval(t.state)[name]
    best = {"metric": metric, "value": candidates[name], "weights": name, "epoch": epoch + 1}
    if t.dist.main:
        checkpoint.export_weights(model.state_dict(), t.run_dir / checkpoint.BEST, metadata={
            "recipe": t.recipe.to_yaml(), "model": t.recipe.model.name, "weights": name,
            "classes": json.dumps(t.classes), "epoch": str(epoch + 1), metric: repr(candidates[name])})
    return best


def bad_images(t: Training) -> int:
    """Unreadable images met so far by any rank, over both splits (a collective call)."""
    return t.train_split.bad_count(t.dist.device) + t.val_split.bad_count(t.dist.device)


def epoch_line(record: dict) -> str:
    s = record["train"]
    text = f"epoch {record['epoch']}: task {s['task_loss']:.4f} kd {s['kd_loss']:.4f} {s['img_per_s']:.0f} img/s"
    for name in ("raw", "ema"):
        if name in record:
            m = record[name]
            text += f" | {name} top1 {m['top1']:.2f} top5 {m['top5']:.2f} nll {m['nll']:.3f}"
            if "agreement" in m:
                text += f" agree {m['agreement']:.1f}"
    return text
