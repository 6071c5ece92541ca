"""What a run has done so far, and where it is kept: the Ledger (position, best, history), its
checkpoint (last.pt: save and resume), the best weights (best.safetensors) and the summary."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from usi import recipe as recipe_mod
from usi.errors import UsageError
from usi.evaluation.metrics import best_of, better
from usi.runtime import environment, files
from usi.training import checkpoint, rundir
from usi.training.build import Training
from usi.training.engine import Position, TrainState, due

log = logging.getLogger("usi")


@dataclass
class Ledger:
    """What a run has done so far; a checkpoint holds it whole, so a resume continues exactly."""
    at: Position  # where training continues
    best: dict  # the best weights so far: metric, value, raw or EMA, epoch
    history: list  # one record per finished epoch (metrics.jsonl is rewritten from it on resume)
    teacher: dict = field(default_factory=dict)  # the teacher's val metrics
    pending: dict | None = None  # an epoch trained but not yet evaluated (a stop during its evaluation)
    wall_before: float = 0.0  # seconds of earlier invocations, start-up included
    started: float = field(default_factory=time.time)  # when this invocation started

    def wall_s(self) -> float:
        return self.wall_before + (time.time() - self.started)


def models_to_eval(state: TrainState) -> dict:
    return {"raw": state.student} | ({"ema": state.ema.module} if state.ema is not None else {})


def save(t: Training, ledger: Ledger) -> None:
    state = checkpoint.capture(t.state, recipe_yaml=t.recipe.to_yaml(), classes=t.classes, at=ledger.at,
                               best=ledger.best)
    checkpoint.save({**state, "history": ledger.history, "teacher_metrics": ledger.teacher,
                     "pending": ledger.pending, "wall_s": ledger.wall_s(),
                     "versions": t.versions}, t.run_dir / checkpoint.LAST)


def mid_epoch_checkpoint(t: Training, ledger: Ledger, at: Position) -> None:
    """After an update: a checkpoint every run.ckpt_every_steps updates, except at the epoch's end."""
    if due(at.updates, t.recipe.run.ckpt_every_steps) and at.step < t.steps and t.dist.main:
        save(t, replace(ledger, at=at, pending=None))


def resume(t: Training, path: Path) -> Ledger:
    """Restore a checkpoint into the built objects, after checking that it is this run's."""
    saved = checkpoint.restore(t.state, path)
    rundir.check_same_recipe(t.recipe, recipe_mod.parse_yaml(saved["recipe"], f"{path}'s recipe"),
                             f"cannot resume from {path}")
    if saved["classes"] != t.classes:
        first = next((i for i, (a, b) in enumerate(zip(saved["classes"], t.classes)) if a != b),
                     min(len(saved["classes"]), len(t.classes)))
        raise UsageError(f"cannot resume from {path}: it was trained on {len(saved['classes'])} classes and "
                         f"data.root has {len(t.classes)}, and they differ at label {first} "
                         f"({(saved['classes'] + ['-'])[first]!r} vs {(t.classes + ['-'])[first]!r}); labels "
                         f"would be silently remapped")
    environment.warn_if_versions_differ(saved.get("versions"), t.versions, f"checkpoint {path}")
    ledger = Ledger(Position(saved["epoch"], saved["step"], saved["num_updates"]), saved["best"],
                    saved.get("history", []), saved.get("teacher_metrics", {}), saved.get("pending"),
                    saved.get("wall_s", 0.0))
    log.info(f"resumed from {path}: epoch {ledger.at.epoch + 1}, step {ledger.at.step}")
    return ledger


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
        files.export_weights(model.state_dict(), t.run_dir / checkpoint.BEST, metadata={
            "recipe": t.recipe.to_yaml(), "model": t.recipe.model.name, "weights": name,
            "classes": json.dumps(t.classes), "epoch": str(epoch + 1), metric: repr(candidates[name]),
            "versions": json.dumps(t.versions)})
    return best


def finish(t: Training, ledger: Ledger) -> dict:
    """summary.json, from the ledger: a run resumed after its last epoch writes the same one. Its speed is
    the whole run's (images over training time, every epoch); its wall time, every invocation's, start-up
    included."""
    recipe, history = t.recipe, ledger.history
    final = next((r for r in reversed(history) if "raw" in r), {})
    train_time = sum(r["train"]["time_s"] for r in history)
    summary = {
        "model": recipe.model.name,
        "teacher": " + ".join(t.name for t in recipe.teachers()) if recipe.kd else None,
        "params": t.params, "epochs": t.epochs, "num_classes": len(t.classes), "best": ledger.best,
        "final": {k: v for k, v in final.items() if k in ("raw", "ema")},
        "teacher_metrics": ledger.teacher,
        "train_img_per_s": sum(r["train"].get("images", 0) for r in history) / train_time if train_time else None,
        "train_time_s": train_time, "wall_time_s": ledger.wall_s(),
        "versions": t.versions,
    }
    if t.dist.main:
        rundir.write_summary(t.run_dir, summary)
        best = ledger.best
        log.info(f"done: best {best.get('metric')} {best.get('value', float('nan')):.2f} "
                 f"({best.get('weights')} weights, epoch {best.get('epoch')}) -> {t.run_dir}")
    return summary
