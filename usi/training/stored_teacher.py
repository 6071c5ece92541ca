"""teacher.soft_labels in a training run: the store's facts against the run's, a few stored steps recomputed
with the live teacher, then the store answers for the teacher in every step (usi/distill/soft_labels.py).

Called by build_training, so `usi train --dry-run` checks the facts too; the writer is
usi/training/soft_label_pass.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from usi.data.loader import fill_mean, next_batch, randaugment_on_device
from usi.distill import soft_labels as store
from usi.errors import UsageError
from usi.models import input_spec
from usi.training.engine import prepare_batch

log = logging.getLogger("usi")

CHECKED_STEPS = 2  # stored steps recomputed with the live teacher at the start of a run (epoch 1, and the last)


def run_facts(t) -> dict:
    recipe = t.recipe
    spec = input_spec(t.state.student, recipe.data.input_size)
    return store.facts(recipe, files=store.data_digest(t.train_split), spec=spec, fill=fill_mean(recipe.aug, spec),
                       on_device=randaugment_on_device(recipe.aug, t.dist.device), world=t.dist.world,
                       steps=t.steps, epochs=t.epochs, compute=t.cfg.compute)


def attach(t, *, check: bool = True) -> None:
    """t: a built Training (usi/training/build.py). teacher.soft_labels: refuses a store of other facts, recomputes a few stored steps with the live
    teacher (`check`), then lets the store answer for the teacher in every training step."""
    folder = Path(t.recipe.teacher.soft_labels)
    manifest = store.open_store(folder, run_facts(t), classes=len(t.classes),
                                fill_fixed=t.recipe.aug.randaugment_fill is not None)
    labels = store.StoredLabels(folder, manifest, rank=t.dist.rank, teacher=t.state.teacher)
    if check:
        self_check(t, labels)
    t.train_loader = labels.follow(t.train_loader)
    t.state.soft_labels = labels
    checked = f"; {CHECKED_STEPS} steps of epochs 1 and {t.epochs} recomputed and matched" if check else ""
    log.info(f"soft labels: {folder} (top-{manifest['top_k']} of {manifest['classes']} classes) answers for the "
             f"teacher{checked}")


def self_check(t, labels: store.StoredLabels) -> None:
    """The first stored steps of the first and last epochs against the live teacher on the same batches: a
    changed teacher file, data file or augmentation code is caught before any step trains on stale labels."""
    for epoch in sorted({0, t.epochs - 1}):
        batches = t.train_loader.epoch(epoch, 0)
        for step in range(min(CHECKED_STEPS, t.steps)):
            batch, error = next_batch(batches)
            if error is not None or batch is None:
                raise error or RuntimeError("the training loader gave no batch")
            x, _ = prepare_batch(t.state, t.cfg, *batch)
            with t.cfg.compute.autocast():
                live = t.state.teacher(x).float()
            stored = labels.logits_at(epoch, step).to(live.device)
            mismatch(live, stored, top_k=labels.manifest["top_k"], amp=t.cfg.compute.amp_dtype is not None,
                     where=f"epoch {epoch + 1}, step {step}", folder=labels.folder)
        del batches


def mismatch(live: torch.Tensor, stored: torch.Tensor, *, top_k: int, amp: bool, where: str, folder: Path) -> None:
    """Raises when the stored top-K logits are not the live teacher's, beyond the rounding of the precision."""
    indices = stored.topk(top_k, dim=1).indices
    diff = (live.gather(1, indices) - stored.gather(1, indices)).abs().max().item()
    scale = 1.0 + live.abs().max().item()
    tolerance = (5e-2 if amp else 1e-3) * scale  # GPU kernels may round differently run to run
    if not diff <= tolerance:
        raise UsageError(f"teacher.soft_labels={folder} does not match the live teacher at {where} (max |logit "
                         f"difference| {diff:.3g} > {tolerance:.2g}): the teacher's weights, the data or the "
                         f"augmentation code changed since it was written; write it again")
