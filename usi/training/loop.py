"""`usi train`: recipe -> built objects -> resume -> the epoch loop -> summary.

Reads top to bottom: `train` plans the run directory (usi/rundir.py), builds every object from the
recipe (usi/build.py, usi/data) and restores a checkpoint (usi/ledger.py), then `run` loops over epochs
in named phases.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from functools import partial

import torch
from timm.utils import distribute_bn

from usi.errors import UsageError
from usi.evaluation.evaluate import LoaderBroken, evaluate
from usi.evaluation.teacher_logits import teacher_val_logits
from usi.recipe import Recipe
from usi.runtime import distributed
from usi.runtime.preempt import Interrupted, StopSignals
from usi.runtime.progress import Progress, setup_logging
from usi.training import build as make
from usi.training import checkpoint, rundir
from usi.training.build import Training
from usi.training.engine import (
    EpochResult,
    Guard,
    NonFiniteError,
    Position,
    due,
    train_one_epoch,
)
from usi.training.ledger import (
    Ledger,
    export_if_best,
    finish,
    mid_epoch_checkpoint,
    models_to_eval,
    resume,
    save,
)
from usi.training.tracking import Trackers

log = logging.getLogger("usi")


def train(recipe: Recipe) -> dict:
    started = time.time()
    dist = distributed.setup(recipe.run.device)
    lock = None
    try:
        setup_logging(None, dist.main)
        run_dir, resume_from, lock = rundir.plan(recipe, lock=dist.main)
        try:
            training = make.build_training(recipe, dist, run_dir, fresh=resume_from is None)
            ledger = resume(training, resume_from) if resume_from is not None else Ledger(Position(0, 0, 0), {}, [])
            ledger.started = started
            rundir.create(recipe, run_dir, dist, training.versions)
        except BaseException:
            if lock is not None:
                lock.release(failed=True)  # a failed start leaves no directory behind
                lock = None
            raise
        setup_logging(run_dir, dist.main)
        return run(training, ledger)
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()


# ---------------------------------------------------------------- run


def run(t: Training, ledger: Ledger) -> dict:
    """The epoch loop, from where the ledger stands (a resumed checkpoint's position is all the state
    there is: every epoch's randomness derives from it)."""
    recipe, dist = t.recipe, t.dist
    if dist.main:
        rundir.write_metrics(t.run_dir, ledger.history)  # drops lines a crash left behind the checkpoint
    if ledger.at.epoch >= t.epochs:
        log.info(f"{t.run_dir} already finished all {t.epochs} epochs; nothing to do")
        return rundir.read_summary(t.run_dir) or finish(t, ledger)  # a lost summary is rebuilt
    trackers = Trackers(recipe.run.loggers, t.run_dir, recipe.to_dict(), dist.main)
    try:
        return loop(t, ledger, trackers)
    finally:
        trackers.close()


def loop(t: Training, ledger: Ledger, trackers: Trackers) -> dict:
    recipe, dist = t.recipe, t.dist
    guard = Guard(dist.device, recipe.run.max_nonfinite)
    progress = Progress(dist.main)
    stop_at = min(t.epochs, ledger.at.epoch + recipe.run.stop_after) if recipe.run.stop_after else t.epochs
    skipped = Skipped()
    with StopSignals(dist.distributed) as stops:
        # ---- the teacher's val logits, once (minutes on ImageNet: a stop signal is honoured here too)
        teacher_logits = None
        try:
            ledger.teacher, teacher_logits = val_teacher(t)
        except LoaderBroken:
            if not stops.agree()[0]:
                raise
        signum = stops.agree()[0]
        if signum:
            stop(t, ledger, signum)
        while ledger.at.epoch < stop_at:
            at = ledger.at
            if ledger.pending is not None and at.step >= t.steps:
                # ---- stopped during this epoch's evaluation last time: only the evaluation is left
                record, result = ledger.pending, EpochResult(ledger.pending["train"],
                                                             Position(at.epoch + 1, 0, at.updates))
                ledger.pending = None
            else:
                # ---- train one epoch (from a mid-epoch step when resuming), stopping early on a signal
                record, result = train_phase(t, ledger, stops, guard, progress, trackers, skipped)
            # ---- evaluate raw and EMA weights (the very weights rank 0 saves); export the best
            if due(at.epoch + 1, recipe.run.eval_every, last=t.epochs):
                t_eval = time.time()
                try:
                    metrics = evaluate_epoch(t, teacher_logits)
                except LoaderBroken:  # a stop signal killed the val loader's workers: evaluate on resume
                    signum = stops.agree()[0]
                    if not signum:
                        raise
                    ledger.at, ledger.pending = Position(at.epoch, t.steps, result.end.updates), record
                    stop(t, ledger, signum, evaluating=True)
                record["eval_time_s"] = time.time() - t_eval
                ledger.best = export_if_best(t, metrics, at.epoch, ledger.best)
                record.update(metrics)
            # ---- unreadable images met so far (train and val apart), this epoch's evaluation included
            bad_train, bad_val = bad_images(t)
            record["train"]["bad_images"], record["val_bad_images"] = bad_train, bad_val
            if bad_train + bad_val > recipe.data.max_bad_samples:
                raise UsageError(f"{bad_train + bad_val} unreadable images so far exceeds "
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
    return finish(t, ledger)


@dataclass
class Skipped:
    """Non-finite updates: the guard counts since this process started; metrics.jsonl per epoch."""
    before: int = 0

    def this_epoch(self, so_far: int) -> int:
        count, self.before = so_far - self.before, so_far
        return count


def train_phase(t: Training, ledger: Ledger, stops: StopSignals, guard: Guard, progress: Progress,
                trackers: Trackers, skipped: Skipped) -> tuple[dict, EpochResult]:
    """One epoch's training (from ledger.at) -> (its metrics.jsonl record so far, the engine's result).
    A stop signal mid-epoch checkpoints where it stopped and raises Interrupted."""
    recipe, at, t0 = t.recipe, ledger.at, time.time()
    try:
        result = train_one_epoch(
            t.state, t.cfg, t.train_loader.epoch(at.epoch, at.step), start=at, steps=t.steps,
            epochs=t.epochs, guard=guard, progress=progress, log_interval=recipe.run.log_interval,
            images_per_step=recipe.data.batch_size * t.dist.world,
            on_update=partial(mid_epoch_checkpoint, t, ledger), should_stop=stops.agree,
            on_log=trackers.interval)
    except NonFiniteError as e:
        last = t.run_dir / checkpoint.LAST
        raise NonFiniteError(f"{e}; last good checkpoint: {last if last.is_file() else 'none yet'}") from None
    if result.end.epoch == at.epoch:  # stopped mid-epoch: checkpoint where it stopped, then exit
        ledger.at = result.end
        stop(t, ledger, result.stopped_by)
    check_some_update_counted(t, result, at, skipped.before)
    stats = {**result.stats, "time_s": time.time() - t0,
             "skipped_updates": skipped.this_epoch(result.stats["skipped_updates"])}
    return {"epoch": at.epoch + 1, "train": stats}, result


def evaluate_epoch(t: Training, teacher_logits: torch.Tensor | None) -> dict:
    models = models_to_eval(t.state)
    if t.dist.distributed:
        for model in models.values():  # each rank's BatchNorm statistics moved with its own batches
            distribute_bn(model, t.dist.world, reduce=False)
    metrics, _ = evaluate(models, t.val_loader, t.cfg.compute, n_bins=t.recipe.run.ece_bins,
                          teacher_logits=teacher_logits)
    if metrics["raw"]["count"] == 0:
        raise UsageError(f"no val image could be read ({t.val_split.bad_count(t.dist.device)} unreadable; see the "
                         f"warnings above)")
    return metrics


def check_some_update_counted(t: Training, result, at: Position, skipped_before: int) -> None:
    """An epoch whose every update was skipped as non-finite trained nothing: the run has diverged, even
    when run.max_nonfinite (in a row) is larger than an epoch."""
    updates = result.end.updates - at.updates
    if updates and result.stats["skipped_updates"] - skipped_before >= updates:
        last = t.run_dir / checkpoint.LAST
        raise NonFiniteError(f"every one of the {updates} updates of epoch {at.epoch + 1} was skipped as non-finite "
                             f"(lr {result.stats['lr']:.3g}); last good checkpoint: "
                             f"{last if last.is_file() else 'none yet'}")


def stop(t: Training, ledger: Ledger, signum: int, saved: bool = False, evaluating: bool = False) -> None:
    """After a stop signal every rank agreed on: rank 0 writes the checkpoint; all ranks raise."""
    path = t.run_dir / checkpoint.LAST
    if t.dist.main and not saved:
        save(t, ledger)
    distributed.barrier()
    at = ledger.at
    if evaluating:
        where = f"epoch {at.epoch + 1}'s evaluation (its training is saved; the resume evaluates it)"
    elif at.step:
        where = f"epoch {at.epoch + 1}, step {at.step} of {t.steps}"
    else:
        where = f"the end of epoch {at.epoch}" if at.epoch else "the start, before the first update"
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at {where}: checkpoint {path}; "
                              f"continue with run.resume=auto")


def val_teacher(t: Training) -> tuple[dict, torch.Tensor | None]:
    """The teacher's val metrics, once; this rank's logits serve every epoch's fidelity metrics."""
    if t.state.teacher is None:
        return {}, None
    t0 = time.time()
    metrics, logits, hit = teacher_val_logits(t.state.teacher, t.recipe, t.val_split, t.val_loader,
                                              compute=t.cfg.compute, n_bins=t.recipe.run.ece_bins, dist=t.dist)
    log.info(f"teacher val top-1 {metrics.get('top1', float('nan')):.2f} "
             f"({cache_note(hit, t.val_split)}, {time.time() - t0:.1f} s)")
    return metrics, logits


def cache_note(hit: bool, split) -> str:
    if hit:
        return "cached"
    return "computed and cached" if split.cache_identity() is not None else "computed; shards are not cached"


def bad_images(t: Training) -> tuple[int, int]:
    """Unreadable images met so far by any rank, (train, val) (a collective call)."""
    return t.train_split.bad_count(t.dist.device), t.val_split.bad_count(t.dist.device)


def epoch_line(record: dict) -> str:
    s = record["train"]
    feature = f" feat {s['feature_loss']:.4f}" if "feature_loss" in s else ""
    text = (f"epoch {record['epoch']}: task {s['task_loss']:.4f} kd {s['kd_loss']:.4f}{feature} "
            f"{s['img_per_s']:.0f} img/s")
    for name in ("raw", "ema"):
        if name in record:
            m = record[name]
            text += f" | {name} top1 {m['top1']:.2f} top5 {m['top5']:.2f} nll {m['nll']:.3f}"
            if "agreement" in m:
                text += f" agree {m['agreement']:.1f}"
    return text
