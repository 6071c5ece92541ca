"""`usi train`: recipe -> built objects -> resume -> the epoch loop -> summary.

Reads top to bottom: `train` plans the run directory (usi/training/rundir.py), builds every object from
the recipe (usi/training/build.py, usi/data) and restores a checkpoint into the ledger
(usi/training/ledger.py), then `loop` goes over epochs in named phases. The feed (usi/training/feed.py)
decides when training stops, the meter (usi/training/meter.py) what an interval shows, the ledger what
is kept.
"""
from __future__ import annotations

import logging
import signal
import time

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
from usi.training import rundir
from usi.training.build import Training
from usi.training.engine import EpochResult, train_one_epoch
from usi.training.feed import Feed, Position, due
from usi.training.ledger import Ledger
from usi.training.meter import Guard, Meter, NonFiniteError
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
            training = make.build_training(recipe, dist, fresh=resume_from is None)
            ledger = Ledger(training.state, recipe=recipe, classes=training.classes, run_dir=run_dir,
                            steps=training.steps, epochs=training.epochs, main=dist.main,
                            selection=training.selection)
            if resume_from is not None:
                ledger.resume(resume_from)
            ledger.started = started
            rundir.create(recipe, run_dir, dist, ledger.versions)
            setup_logging(run_dir, dist.main)
            return run(training, ledger)
        except BaseException:
            # a start that fails before its first checkpoint (a tracker, the teacher's pass, data found bad
            # late, ...) leaves nothing that blocks the corrected command: the lock removes what it wrote
            if lock is not None and lock.release(failed=True):
                setup_logging(None, dist.main)  # its log.txt is gone: the error line goes to the console only
            lock = None
            raise
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()


# ---------------------------------------------------------------- run


def run(t: Training, ledger: Ledger) -> dict:
    """The epoch loop, from where the ledger stands (a resumed checkpoint's position is all the state
    there is: every epoch's randomness derives from it)."""
    ledger.open()
    if ledger.finished:
        log.info(f"{ledger.run_dir} already finished all {t.epochs} epochs; nothing to do")
        return rundir.read_summary(ledger.run_dir) or ledger.finish()  # a lost summary is rebuilt
    trackers = Trackers(t.recipe.run.loggers, ledger.run_dir, t.recipe.to_dict(), t.dist.main)
    try:
        with StopSignals(t.dist.distributed) as stops:
            feed = Feed(t.train_loader, steps=t.steps, accum=t.cfg.accum_steps, stops=stops)
            meter = Meter(t.state.optimizer, guard=Guard(t.dist.device, t.recipe.run.max_nonfinite),
                          progress=Progress(t.dist.main), log_interval=t.recipe.run.log_interval,
                          images_per_step=t.recipe.data.batch_size * t.dist.world, steps=t.steps,
                          epochs=t.epochs, feature_kd=t.state.features is not None, on_log=trackers.interval,
                          val_images=len(t.val_split), eval_every=t.recipe.run.eval_every,
                          eval_s=next((r["eval_time_s"] for r in reversed(ledger.history) if "eval_time_s" in r),
                                      None))
            return loop(t, ledger, feed=feed, meter=meter, trackers=trackers)
    finally:
        trackers.close()


def loop(t: Training, ledger: Ledger, *, feed: Feed, meter: Meter, trackers: Trackers) -> dict:
    recipe = t.recipe
    stop_at = min(t.epochs, ledger.at.epoch + recipe.run.stop_after) if recipe.run.stop_after else t.epochs
    # ---- the teacher's val (and minival) logits, once (minutes on ImageNet: a stop signal is honoured here too)
    teacher_logits, broken = {}, None
    try:
        ledger.teacher, teacher_logits["val"] = val_teacher(t)
        if t.minival_split is not None:
            teacher_logits["minival"] = val_teacher(t, "minival")[1]
    except LoaderBroken as e:
        broken = e
    if signum := feed.signal(broken):
        stop(t, ledger, signum)
    while ledger.at.epoch < stop_at:
        at = ledger.at
        if ledger.pending is not None and at.step >= t.steps:
            # ---- stopped during this epoch's evaluation last time: only the evaluation is left
            record, result = ledger.pending, EpochResult(ledger.pending["train"], Position(at.epoch + 1, 0, at.updates))
            ledger.pending = None
        else:
            # ---- train one epoch (from a mid-epoch step when resuming), stopping early on a signal
            record, result = train_phase(t, ledger, feed=feed, meter=meter)
        # ---- evaluate raw and EMA weights (the very weights rank 0 saves) on val, and on minival when
        # data.minival holds one out; export the best on the selection split (minival, else val)
        if due(at.epoch + 1, recipe.run.eval_every, last=t.epochs):
            t_eval = time.time()
            try:
                metrics = evaluate_epoch(t, teacher_logits)
            except LoaderBroken as e:  # a stop signal killed the val loader's workers: evaluate on resume
                signum = feed.signal(e)
                ledger.evaluation_stopped(record, result.end.updates)
                stop(t, ledger, signum, evaluating=True)
            record["eval_time_s"] = meter.eval_s = time.time() - t_eval  # the ETA's next evaluations
            selected_on = "minival" if "minival" in metrics else "val"
            ledger.evaluated(metrics[selected_on], at.epoch)
            record.update(metrics["val"], selected_on=selected_on)
            if "minival" in metrics:
                record["minival"] = metrics["minival"]
        # ---- unreadable images met so far (train and val apart), this epoch's evaluation included
        check_bad_images(t, record)
        # ---- checkpoint at the epoch's end (the record with it), then log
        ledger.epoch_done(record, result.end)
        log.info(epoch_line(record))
        trackers.epoch(record, ledger.at.updates)
        if signum := result.stopped_by or feed.signal():
            stop(t, ledger, signum, saved=True)
    if ledger.at.epoch < t.epochs:
        log.info(f"stopped after epoch {ledger.at.epoch} (run.stop_after={recipe.run.stop_after}); "
                 f"continue with run.resume=auto")
        return {"stopped_at_epoch": ledger.at.epoch}
    summary = ledger.finish()
    trackers.summary(summary)
    return summary


def train_phase(t: Training, ledger: Ledger, *, feed: Feed, meter: Meter) -> tuple[dict, EpochResult]:
    """One epoch's training (from ledger.at) -> (its metrics.jsonl record so far, the engine's result).
    A stop signal mid-epoch checkpoints where it stopped and raises Interrupted."""
    at, t0 = ledger.at, time.time()
    labels = t.state.soft_labels
    read_s = labels.read_s if labels is not None else 0.0
    try:
        result = train_one_epoch(t.state, t.cfg, feed.epoch(at), meter, on_update=ledger.after_update)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}; last good checkpoint: {last_good(ledger)}") from None
    if result.end.epoch == at.epoch:  # stopped mid-epoch: checkpoint where it stopped, then exit
        ledger.at = result.end
        stop(t, ledger, result.stopped_by)
    check_some_update_counted(ledger, result, at)
    train = {**result.stats, "time_s": time.time() - t0}
    if labels is not None:  # what teacher.soft_labels cost this epoch, against the epoch's training time
        train["soft_labels_read_s"] = labels.read_s - read_s
    return {"epoch": at.epoch + 1, "train": train}, result


def evaluate_epoch(t: Training, teacher_logits: dict) -> dict:
    """{"val": {raw/ema: metrics}} and, with data.minival, "minival": the same on the held-out images."""
    models = t.state.models_to_eval()
    if t.dist.distributed:
        for model in models.values():  # each rank's BatchNorm statistics moved with its own batches
            distribute_bn(model, t.dist.world, reduce=False)
    result = {}
    for name in ("val", "minival") if t.minival_split is not None else ("val",):
        split, loader = getattr(t, f"{name}_split"), getattr(t, f"{name}_loader")
        metrics, _ = evaluate(models, loader, t.cfg.compute, n_bins=t.recipe.run.ece_bins,
                              teacher_logits=teacher_logits.get(name))
        if metrics["raw"]["count"] == 0:
            raise UsageError(f"no {name} image could be read ({split.bad_count(t.dist.device)} unreadable; see the "
                             f"warnings above)")
        result[name] = metrics
    return result


def check_some_update_counted(ledger: Ledger, result: EpochResult, at: Position) -> None:
    """An epoch whose every update was skipped as non-finite trained nothing: the run has diverged, even
    when run.max_nonfinite (in a row) is larger than an epoch."""
    updates = result.end.updates - at.updates
    if updates and result.stats["skipped_updates"] >= updates:
        raise NonFiniteError(f"every one of the {updates} updates of epoch {at.epoch + 1} was skipped as non-finite "
                             f"(lr {result.stats['lr']:.3g}); last good checkpoint: {last_good(ledger)}")


def last_good(ledger: Ledger) -> str:
    return str(ledger.last) if ledger.last.is_file() else "none yet"


def stop(t: Training, ledger: Ledger, signum: int, saved: bool = False, evaluating: bool = False) -> None:
    """After a stop signal every rank agreed on: rank 0 writes the checkpoint; all ranks raise."""
    if not saved:
        ledger.save()
    distributed.barrier()
    at = ledger.at
    if evaluating:
        where = f"epoch {at.epoch + 1}'s evaluation (its training is saved; the resume evaluates it)"
    elif at.step:
        where = f"epoch {at.epoch + 1}, step {at.step} of {t.steps}"
    else:
        where = f"the end of epoch {at.epoch}" if at.epoch else "the start, before the first update"
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at {where}: checkpoint {ledger.last}; "
                              f"continue with run.resume=auto")


def val_teacher(t: Training, name: str = "val") -> tuple[dict, torch.Tensor | None]:
    """The teacher's metrics on the val (or minival) split, once; this rank's logits serve every epoch's
    fidelity metrics."""
    if t.state.teacher is None:
        return {}, None
    t0 = time.time()
    split = getattr(t, f"{name}_split")
    metrics, logits, cached = teacher_val_logits(t.state.teacher, t.recipe, split, getattr(t, f"{name}_loader"),
                                                 compute=t.cfg.compute, n_bins=t.recipe.run.ece_bins, dist=t.dist)
    log.info(f"teacher {name} top-1 {metrics.get('top1', float('nan')):.2f} ({cached.note}, {time.time() - t0:.1f} s)")
    return metrics, logits


def check_bad_images(t: Training, record: dict) -> None:
    """Unreadable images met so far by any rank (a collective call), into the record; past
    data.max_bad_samples, the run ends."""
    bad_train, bad_val = t.train_split.bad_count(t.dist.device), t.val_split.bad_count(t.dist.device)
    record["train"]["bad_images"], record["val_bad_images"] = bad_train, bad_val
    if t.minival_split is not None:  # its own flags: held-out train images
        record["minival_bad_images"] = t.minival_split.bad_count(t.dist.device)
        bad_train += record["minival_bad_images"]
    if bad_train + bad_val > t.recipe.data.max_bad_samples:
        raise UsageError(f"{bad_train + bad_val} unreadable images so far exceeds "
                         f"data.max_bad_samples={t.recipe.data.max_bad_samples}; see the warnings above for "
                         f"their paths")


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
    for name, m in record.get("minival", {}).items():
        text += f" | minival {name} top1 {m['top1']:.2f}"
    return text
