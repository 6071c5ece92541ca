"""The ledger: what a run has done so far, and what it keeps of it, and when.

timm's CheckpointSaver is the model: the loop tells the ledger what happened (`after_update`,
`evaluated`, `epoch_done`, `evaluation_stopped`, `finish`) and the ledger decides what is written:
  - last.pt (usi/training/checkpoint.py) at every epoch's end, at a stop, and every run.ckpt_every_steps
    updates within an epoch; it holds the record whole, so a resume continues exactly;
  - best.safetensors when run.best_metric improves on the best so far (raw or EMA weights), on the
    selection split: val, or the minival split that data.minival holds out of train; and, with
    run.keep_best=k > 1, the runners-up as best-e<epoch>.safetensors: the top k by run.best_metric (timm's
    max_history); one that drops out of the top k is deleted;
  - metrics.jsonl, one line per finished epoch (rewritten from the record on resume);
  - summary.json once the last epoch is done.
Every rank keeps the same record; only rank 0 writes.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from pathlib import Path

from usi import recipe as recipe_mod
from usi.errors import UsageError
from usi.evaluation.metrics import best_of, better
from usi.recipe import Recipe
from usi.runtime import environment, files
from usi.training import checkpoint, rundir
from usi.training.engine import TrainState
from usi.training.feed import Position, due

log = logging.getLogger("usi")


class Ledger:
    def __init__(self, state: TrainState, *, recipe: Recipe, classes: list[str], run_dir: Path, steps: int,
                 epochs: int, main: bool, selection: str = "val"):
        self.state, self.recipe, self.classes, self.run_dir = state, recipe, classes, run_dir
        self.selection = selection  # the split `evaluated` ranks on: "val", or "minival (N images)"
        self.steps, self.epochs, self.main = steps, epochs, main  # steps per epoch; epochs with cool-down
        self.versions = environment.versions()  # usi, torch, timm, CUDA, cuDNN, git: in every checkpoint
        # ---- the record (a checkpoint holds it whole)
        self.at = Position(0, 0, 0)  # where training continues
        self.best = {}  # the best weights so far: metric, value, raw or EMA, epoch
        self.kept = []  # the top run.keep_best, best first: best's entries and the file each is kept in
        self.schedule_changes = []  # a resume that changed sched.epochs: when, from and to
        self.history = []  # one record per finished epoch
        self.teacher = {}  # the teacher's val metrics
        self.pending = None  # an epoch trained but not yet evaluated (a stop during its evaluation)
        self.wall_before = 0.0  # seconds of earlier invocations, start-up included
        self.started = time.time()  # when this invocation started

    @property
    def last(self) -> Path:
        return self.run_dir / checkpoint.LAST

    @property
    def finished(self) -> bool:
        return self.at.epoch >= self.epochs

    def wall_s(self) -> float:
        return self.wall_before + (time.time() - self.started)

    # ---------------------------------------------------------------- what the loop reports

    def open(self) -> None:
        """At the start of an invocation: metrics.jsonl as the record says (a crash between a checkpoint and
        its line, or during the line, leaves nothing that a resume keeps)."""
        if self.main:
            rundir.write_metrics(self.run_dir, self.history)
            self.kept = self.kept[:self.recipe.run.keep_best]  # run.keep_best may shrink on resume
            self.remove_unkept()

    def after_update(self, at: Position) -> None:
        """After every optimizer update: a checkpoint every run.ckpt_every_steps updates, except at the
        epoch's end (epoch_done keeps that one, with the epoch's record)."""
        if due(at.updates, self.recipe.run.ckpt_every_steps) and at.step < self.steps:
            self.save(at)

    def evaluated(self, metrics: dict, epoch: int) -> None:
        """Raw and EMA ranked by run.best_metric (`metrics`: on the selection split); the winner's weights
        exported if it enters the top run.keep_best (best.safetensors when it beats the best so far). Each
        file is written atomically before the one that dropped out is deleted."""
        metric = self.recipe.run.best_metric
        candidates = {name: m[metric] for name, m in metrics.items() if metric in m}
        if not candidates:
            return
        name = best_of(candidates, metric)
        entry = {"metric": metric, "value": candidates[name], "weights": name, "epoch": epoch + 1}
        # after every kept entry it does not beat: a tie keeps the earlier epoch ahead
        rank = next((i for i, e in enumerate(self.kept) if better(metric, entry["value"], e["value"])),
                    len(self.kept))
        if math.isnan(entry["value"]) or rank >= self.recipe.run.keep_best:
            return
        entry["file"] = checkpoint.BEST if rank == 0 else f"best-e{epoch + 1}.safetensors"
        kept = self.kept[:rank] + [entry] + self.kept[rank:]
        if rank == 0 and len(kept) > 1 and self.recipe.run.keep_best > 1:
            # the old best stays in the top k: its weights move out of best.safetensors first
            kept[1] = {**kept[1], "file": f"best-e{kept[1]['epoch']}.safetensors"}
            if self.main:
                files.atomic_write(self.run_dir / kept[1]["file"],
                                   lambda tmp: shutil.copyfile(self.run_dir / checkpoint.BEST, tmp))
        self.kept = kept[:self.recipe.run.keep_best]
        self.best = {k: v for k, v in self.kept[0].items() if k != "file"}
        if self.main:
            model = self.state.models_to_eval()[name]
            files.export_weights(model.state_dict(), self.run_dir / entry["file"], metadata={
                "recipe": self.recipe.to_yaml(), "model": self.recipe.model.name, "weights": name,
                "classes": json.dumps(self.classes), "epoch": str(epoch + 1), metric: repr(candidates[name]),
                "selection": self.selection,
                "versions": json.dumps(self.versions)})
            self.remove_unkept()

    def remove_unkept(self) -> None:
        """The runners-up's files that are no longer in the top k (or that a crash left behind)."""
        kept = {e["file"] for e in self.kept}
        for path in self.run_dir.glob("best-e*.safetensors"):
            if path.name not in kept:
                path.unlink(missing_ok=True)

    def epoch_done(self, record: dict, end: Position) -> None:
        """An epoch trained (and evaluated when due): last.pt with its record, then its metrics.jsonl line."""
        self.at, self.history = end, self.history + [record]
        self.save()
        if self.main:
            rundir.append_metrics(self.run_dir, record)

    def evaluation_stopped(self, record: dict, updates: int) -> None:
        """A stop during an epoch's evaluation: its training is kept, the resume evaluates it."""
        self.at, self.pending = Position(self.at.epoch, self.steps, updates), record

    def save(self, at: Position | None = None) -> None:
        """last.pt (rank 0), at `at` (default: where the record stands; mid-epoch, nothing is pending)."""
        if not self.main:
            return
        at = self.at if at is None else at
        state = checkpoint.capture(self.state, recipe_yaml=self.recipe.to_yaml(), classes=self.classes, at=at,
                                   best=self.best)
        checkpoint.save({**state, "history": self.history, "teacher_metrics": self.teacher,
                         "pending": self.pending, "wall_s": self.wall_s(), "kept": self.kept,
                         "schedule_changes": self.schedule_changes,
                         "versions": self.versions}, self.last)

    def finish(self) -> dict:
        """summary.json, from the record: a run resumed after its last epoch writes the same one. Its speed is
        the whole run's (images over training time, every epoch); its wall time, every invocation's,
        start-up included."""
        recipe, history = self.recipe, self.history
        final = next((r for r in reversed(history) if "raw" in r), {})
        train_time = sum(r["train"]["time_s"] for r in history)
        summary = {
            "model": recipe.model.name,
            "teacher": " + ".join(t.name for t in recipe.teachers()) if recipe.kd else None,
            "params": sum(p.numel() for p in self.state.student.parameters()), "epochs": self.epochs,
            "num_classes": len(self.classes), "best": self.best, "kept": self.kept,
            "selection": self.selection, "selected_val": self.selected_val(),
            "schedule_changes": self.schedule_changes,
            "final": {k: v for k, v in final.items() if k in ("raw", "ema")},
            "teacher_metrics": self.teacher,
            "train_img_per_s": sum(r["train"].get("images", 0) for r in history) / train_time if train_time else None,
            "train_time_s": train_time, "wall_time_s": self.wall_s(),
            "versions": self.versions,
        }
        reads = [r["train"]["soft_labels_read_s"] for r in history if "soft_labels_read_s" in r["train"]]
        if reads:  # teacher.soft_labels: the store's reads, within train_time_s
            summary["soft_labels_read_s"] = sum(reads)
        if self.main:
            rundir.write_summary(self.run_dir, summary)
            best = self.best
            log.info(f"done: best {best.get('metric')} {best.get('value', float('nan')):.2f} on {self.selection} "
                     f"({best.get('weights')} weights, epoch {best.get('epoch')}; val top1 "
                     f"{summary['selected_val'].get('top1', float('nan')):.2f}) -> {self.run_dir}")
        return summary

    def selected_val(self) -> dict:
        """The val metrics of the weights best.safetensors holds: val is evaluated with every evaluation (on
        minival too), so they are in the record, and a resumed run finds them there."""
        best = self.best
        record = next((r for r in self.history if r["epoch"] == best.get("epoch")), {})
        return record.get(best.get("weights"), {})

    # ---------------------------------------------------------------- resume

    def resume(self, path: Path) -> None:
        """Restore a checkpoint into the trained objects and the record, after checking that it is this run's."""
        fresh_schedule = copy.deepcopy(self.state.scheduler.state_dict())  # this recipe's sched.epochs
        saved = checkpoint.restore(self.state, path)
        saved_tree = recipe_mod.parse_yaml(saved["recipe"], f"{path}'s recipe")
        rundir.check_same_recipe(self.recipe, saved_tree, f"cannot resume from {path}", resuming=True)
        ours, theirs = self.classes, saved["classes"]
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise UsageError(f"cannot resume from {path}: it was trained on {len(theirs)} classes and "
                             f"data.root has {len(ours)}, and they differ at label {first} "
                             f"({(theirs + ['-'])[first]!r} vs {(ours + ['-'])[first]!r}); labels "
                             f"would be silently remapped")
        environment.warn_if_versions_differ(saved.get("versions"), self.versions, f"checkpoint {path}")
        self.at = Position(saved["epoch"], saved["step"], saved["num_updates"])
        self.best, self.history = saved["best"], saved.get("history", [])
        self.teacher, self.pending = saved.get("teacher_metrics", {}), saved.get("pending")
        self.wall_before = saved.get("wall_s", 0.0)
        self.kept = saved.get("kept") or ([{**self.best, "file": checkpoint.BEST}] if self.best else [])
        self.schedule_changes = saved.get("schedule_changes", [])
        log.info(f"resumed from {path}: epoch {self.at.epoch + 1}, step {self.at.step}")
        before = recipe_mod.from_dict(saved_tree).sched.epochs
        if before != self.recipe.sched.epochs:
            self.change_schedule(before, fresh_schedule, path)

    def change_schedule(self, before: int, fresh_schedule: dict, path: Path) -> None:
        """A resume with another sched.epochs: the schedule is this recipe's, at the update reached (as timm's
        train.py: it builds the scheduler from the new total and steps it to the resumed update)."""
        now, started = self.recipe.sched.epochs, self.at.epoch + (1 if self.at.step else 0)
        cooldown = self.recipe.sched.cooldown_epochs
        if now + cooldown < started:
            raise UsageError(f"cannot resume from {path}: sched.epochs={now} is fewer than the {started} epochs "
                             f"it has already trained; use sched.epochs >= {max(started - cooldown, 1)}")
        self.state.scheduler.load_state_dict(fresh_schedule)
        self.state.scheduler.step_update(num_updates=self.at.updates)
        change = {"epochs_before": before, "epochs": now, "at_epoch": self.at.epoch, "at_update": self.at.updates}
        self.schedule_changes = self.schedule_changes + [change]
        log.info(f"sched.epochs changed from {before} to {now} at epoch {self.at.epoch} (update {self.at.updates}): "
                 f"the lr schedule follows the new total from here")
