"""`usi train`: recipe -> built objects -> resume -> the epoch loop -> summary.

Reads top to bottom: `train` plans the run directory (usi/rundir.py), builds every object from the
recipe (usi/build.py, usi/data) and restores a checkpoint, then `run` loops over epochs in named phases.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from timm.utils import distribute_bn

from usi import build as make
from usi import checkpoint, distributed, environment, rundir
from usi.build import Training
from usi.engine import Guard, NonFiniteError, Position, TrainState, due, evaluate, train_one_epoch
from usi.errors import UsageError
from usi.logit_cache import teacher_val_logits
from usi.metrics import best_of, better
from usi.preempt import Interrupted, StopSignals
from usi.progress import Progress, setup_logging
from usi.recipe import Recipe
from usi.tracking import Trackers

log = logging.getLogger("usi")


def train(recipe: Recipe) -> dict:
    started = time.time()
    dist = distributed.setup(recipe.run.device)
    lock = None
    try:
        setup_logging(None, dist.main)
        run_dir, resume_from, lock = rundir.plan(recipe, lock=dist.main)
        try:
            training = make.build_training(recipe, dist, run_dir)
            ledger = resume(training, resume_from) if resume_from is not None else Ledger(Position(0, 0, 0), {}, [])
            rundir.create(recipe, run_dir, dist, training.versions)
        except BaseException:
            if lock is not None:
                lock.release(failed=True)  # a failed start leaves no directory behind
                lock = None
            raise
        setup_logging(run_dir, dist.main)
        return run(training, ledger, started)
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()


# ---------------------------------------------------------------- run


@dataclass
class Ledger:
    """What a run has done so far; a checkpoint holds it whole, so a resume continues exactly."""
    at: Position  # where training continues
    best: dict  # the best weights so far: metric, value, raw or EMA, epoch
    history: list  # one record per finished epoch (metrics.jsonl is rewritten from it on resume)
    teacher: dict = field(default_factory=dict)  # the teacher's val metrics


def run(t: Training, ledger: Ledger, started: float) -> dict:
    """The epoch loop, from where the ledger stands (a resumed checkpoint's position is all the state
    there is: every epoch's randomness derives from it)."""
    recipe, dist = t.recipe, t.dist
    if dist.main:
        rundir.write_metrics(t.run_dir, ledger.history)  # drops lines a crash left behind the checkpoint
    if ledger.at.epoch >= t.epochs:
        log.info(f"{t.run_dir} already finished all {t.epochs} epochs; nothing to do")
        return rundir.read_summary(t.run_dir) or finish(t, ledger, started)  # a lost summary is rebuilt
    trackers = Trackers(recipe.run.loggers, t.run_dir, recipe.to_dict(), dist.main)
    try:
        return loop(t, ledger, started, trackers)
    finally:
        trackers.close()


def loop(t: Training, ledger: Ledger, started: float, trackers: Trackers) -> dict:
    recipe, dist = t.recipe, t.dist
    ledger.teacher, teacher_logits = val_teacher(t)
    guard = Guard(dist.device, recipe.run.max_nonfinite)
    progress = Progress(dist.main)
    stop_at = min(t.epochs, ledger.at.epoch + recipe.run.stop_after) if recipe.run.stop_after else t.epochs
    skipped_before = 0
    with StopSignals(dist.distributed) as stops:
        while ledger.at.epoch < stop_at:
            # ---- train one epoch (from a mid-epoch step when resuming), stopping early on a signal
            t0, at = time.time(), ledger.at
            try:
                result = train_one_epoch(
                    t.state, t.cfg, t.train_loader.epoch(at.epoch, at.step), start=at, steps=t.steps,
                    epochs=t.epochs, guard=guard, progress=progress, log_interval=recipe.run.log_interval,
                    images_per_step=recipe.data.batch_size * dist.world,
                    on_update=partial(mid_epoch_checkpoint, t, ledger), should_stop=stops.agree,
                    on_log=trackers.interval)
            except NonFiniteError as e:
                last = t.run_dir / checkpoint.LAST
                raise NonFiniteError(f"{e}; last good checkpoint: {last if last.is_file() else 'none yet'}") from None
            if result.end.epoch == at.epoch:  # stopped mid-epoch: checkpoint where it stopped, then exit
                ledger.at = result.end
                stop(t, ledger, result.stopped_by)
            check_some_update_counted(t, result, at, skipped_before)
            skipped_so_far = result.stats["skipped_updates"]  # the guard counts since this process started
            record = {"epoch": at.epoch + 1, "train": {**result.stats, "time_s": time.time() - t0,
                                                       "skipped_updates": skipped_so_far - skipped_before}}
            skipped_before = skipped_so_far
            # ---- evaluate raw and EMA weights (the very weights rank 0 saves); export the best
            if due(at.epoch + 1, recipe.run.eval_every, last=t.epochs):
                t_eval = time.time()
                models = models_to_eval(t.state)
                if dist.distributed:
                    for model in models.values():  # each rank's BatchNorm statistics moved with its own batches
                        distribute_bn(model, dist.world, reduce=False)
                metrics, _ = evaluate(models, t.val_loader, t.cfg.compute, n_bins=recipe.run.ece_bins,
                                      teacher_logits=teacher_logits)
                record["eval_time_s"] = time.time() - t_eval
                ledger.best = export_if_best(t, metrics, at.epoch, ledger.best)
                record.update(metrics)
            # ---- unreadable images met so far, this epoch's evaluation included
            record["train"]["bad_images"] = bad_images(t)
            if record["train"]["bad_images"] > recipe.data.max_bad_samples:
                raise UsageError(f"{record['train']['bad_images']} unreadable images so far exceeds "
                                 f"data.max_bad_samples={recipe.data.max_bad_samples}; see the warnings above for "
                                 f"their paths")
            # ---- checkpoint at the epoch's end (the record with it), then log
            ledger.at, ledger.history = result.end, ledger.history + [record]
            if dist.main:
                save(t, ledger)
                rundir.append_metrics(t.run_dir, record)
                log.info(epoch_line(record))
                trackers.epoch(record, ledger.at.updates)
            signum = result.stopped_by or stops.agree()[0]
            if signum:
                stop(t, ledger, signum, saved=True)
    if ledger.at.epoch < t.epochs:
        log.info(f"stopped after epoch {ledger.at.epoch} (run.stop_after={recipe.run.stop_after}); "
                 f"continue with run.resume=auto")
        return {"stopped_at_epoch": ledger.at.epoch}
    return finish(t, ledger, started)


def resume(t: Training, path: Path) -> Ledger:
    """Restore a checkpoint into the built objects, after checking that it is this run's."""
    saved = checkpoint.restore(t.state, path)
    rundir.check_same_recipe(t.recipe, yaml.safe_load(saved["recipe"]), f"cannot resume from {path}")
    if saved["classes"] != t.classes:
        first = next((i for i, (a, b) in enumerate(zip(saved["classes"], t.classes)) if a != b),
                     min(len(saved["classes"]), len(t.classes)))
        raise UsageError(f"cannot resume from {path}: it was trained on {len(saved['classes'])} classes and "
                         f"data.root has {len(t.classes)}, and they differ at label {first} "
                         f"({(saved['classes'] + ['-'])[first]!r} vs {(t.classes + ['-'])[first]!r}); labels "
                         f"would be silently remapped")
    environment.warn_if_versions_differ(saved.get("versions"), t.versions, f"checkpoint {path}")
    ledger = Ledger(Position(saved["epoch"], saved["step"], saved["num_updates"]), saved["best"],
                    saved.get("history", []), saved.get("teacher_metrics", {}))
    log.info(f"resumed from {path}: epoch {ledger.at.epoch + 1}, step {ledger.at.step}")
    return ledger


def check_some_update_counted(t: Training, result, at: Position, skipped_before: int) -> None:
    """An epoch whose every update was skipped as non-finite trained nothing: the run has diverged, even
    when run.max_nonfinite (in a row) is larger than an epoch."""
    updates = result.end.updates - at.updates
    if updates and result.stats["skipped_updates"] - skipped_before >= updates:
        last = t.run_dir / checkpoint.LAST
        raise NonFiniteError(f"every one of the {updates} updates of epoch {at.epoch + 1} was skipped as non-finite "
                             f"(lr {result.stats['lr']:.3g}); last good checkpoint: "
                             f"{last if last.is_file() else 'none yet'}")


def stop(t: Training, ledger: Ledger, signum: int, saved: bool = False) -> None:
    """After a stop signal every rank agreed on: rank 0 writes the checkpoint; all ranks raise."""
    path = t.run_dir / checkpoint.LAST
    if t.dist.main and not saved:
        save(t, ledger)
    distributed.barrier()
    at = ledger.at
    where = f"epoch {at.epoch + 1}, step {at.step} of {t.steps}" if at.step else f"the end of epoch {at.epoch}"
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at {where}: checkpoint {path}; "
                              f"continue with run.resume=auto")


def finish(t: Training, ledger: Ledger, started: float) -> dict:
    """summary.json, from the ledger: a run resumed after its last epoch writes the same one. Its speed is
    the whole run's (images over training time, every epoch); its wall time, this invocation's from start-up."""
    recipe, history = t.recipe, ledger.history
    final = next((r for r in reversed(history) if "raw" in r), {})
    train_time = sum(r["train"]["time_s"] for r in history)
    summary = {
        "model": recipe.model.name, "teacher": recipe.teacher.name if recipe.kd else None,
        "params": t.params, "epochs": t.epochs, "num_classes": len(t.classes), "best": ledger.best,
        "final": {k: v for k, v in final.items() if k in ("raw", "ema")},
        "teacher_metrics": ledger.teacher,
        "train_img_per_s": sum(r["train"].get("images", 0) for r in history) / train_time if train_time else None,
        "train_time_s": train_time, "wall_time_s": time.time() - started, "versions": t.versions,
    }
    if t.dist.main:
        rundir.write_summary(t.run_dir, summary)
        best = ledger.best
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
    log.info(f"teacher val top-1 {metrics.get('top1', float('nan')):.2f} "
             f"({'cached' if hit else 'computed and cached'}, {time.time() - t0:.1f} s)")
    return metrics, logits


def models_to_eval(state: TrainState) -> dict:
    return {"raw": state.student} | ({"ema": state.ema.module} if state.ema is not None else {})


def save(t: Training, ledger: Ledger) -> None:
    state = checkpoint.capture(t.state, recipe_yaml=t.recipe.to_yaml(), classes=t.classes, at=ledger.at,
                               best=ledger.best)
    checkpoint.save({**state, "history": ledger.history, "teacher_metrics": ledger.teacher,
                     "versions": t.versions}, t.run_dir / checkpoint.LAST)


def mid_epoch_checkpoint(t: Training, ledger: Ledger, at: Position) -> None:
    """After an update: a checkpoint every run.ckpt_every_steps updates, except at the epoch's end."""
    if due(at.updates, t.recipe.run.ckpt_every_steps) and at.step < t.steps and t.dist.main:
        save(t, Ledger(at, ledger.best, ledger.history, ledger.teacher))


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
            "classes": json.dumps(t.classes), "epoch": str(epoch + 1), metric: repr(candidates[name]),
            "versions": json.dumps(t.versions)})
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
