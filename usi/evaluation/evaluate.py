"""One evaluation pass, exact across ranks: every sample once, every model on the same batch, the
teacher's logits run or read from the cache, metrics summed across ranks. Never imports the trainer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from usi.data.loader import next_batch
from usi.distill.teacher import Ensemble, combine_logits
from usi.evaluation.metrics import MetricSums
from usi.models import Compute
from usi.runtime import distributed


def fp32_logits(model: nn.Module, x: torch.Tensor, compute: Compute) -> torch.Tensor:
    """Logits for metrics: the body under autocast, the classifier head in fp32. Rounding 1000-class
    logits to bf16 ties or flips the top class of about 1% of rows; the head is a small part of the cost."""
    if compute.amp_dtype is None:
        return model(x).float()
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return model(x).float()  # not split into body and head: the whole forward in fp32
    with compute.autocast():
        features = model.forward_features(x)
    with torch.autocast(compute.device.type, enabled=False):
        return model.forward_head(features.float()).float()


class LoaderBroken(RuntimeError):
    """An evaluation's loader died (on this rank or another): after a stop signal, a stop; else a failure."""


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, compute: Compute) -> torch.Tensor:
    """A teacher's logits for metrics, [B, C]; an ensemble's are [B, 1 + M, C]: combined, then each member."""
    if isinstance(teacher, Ensemble):
        members = [fp32_logits(m, x, compute) for m in teacher.members]
        return torch.stack([combine_logits(members, teacher.combine), *members], dim=1)
    return fp32_logits(teacher, x, compute)


def member_count(teacher: nn.Module | None, teacher_logits: torch.Tensor | None) -> int:
    if isinstance(teacher, Ensemble):
        return len(teacher.members)
    return teacher_logits.shape[1] - 1 if teacher_logits is not None and teacher_logits.ndim == 3 else 0


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader, compute: Compute, *, n_bins: int = 15,
             teacher: nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
             keep_teacher_logits: bool = False):
    """One pass over this rank's shard; every model sees the same batch. Exact across ranks.

    Teacher logits come from `teacher_logits` (this rank's samples, by position in its pass) when given,
    else from running `teacher`, whose own metrics are then reported as "teacher". An ensemble's logits
    carry its members' too ([n, 1 + M, C]): agreement and KL are then against the ensemble, and each
    model's "members" lists them against each member. Returns ({name: metrics}, this rank's teacher
    logits by position if kept, else None).
    """
    for m in models.values():
        m.eval()
    run_teacher = teacher is not None and teacher_logits is None
    members = member_count(teacher, teacher_logits)
    names = list(models) + (["teacher"] if run_teacher else [])
    sums = {(name, i): MetricSums(n_bins, compute.device) for name in names for i in [None, *range(members)]}
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(compute.device)
    kept = []  # (positions, logits) of this rank's samples
    batches = iter(loader)
    while True:
        batch, broken = next_batch(batches)  # a worker killed by a SIGTERM to the group: broken
        if batch is None:
            break
        x, target = batch  # target rows: [label, the sample's position in this rank's pass]
        if len(target) == 0:
            continue  # every image of this batch was unreadable
        y, pos = target[:, 0], target[:, 1]
        x = compute.layout(x)
        if teacher_logits is not None:
            t = teacher_logits.index_select(0, pos)
        else:
            t = teacher_outputs(teacher, x, compute) if teacher is not None else None
        # against: None (no teacher), or [the teacher's (ensemble's) logits, then each member's]
        against = None if t is None else ([t] if t.ndim == 2 else list(t.unbind(1)))
        for name, model in models.items():
            logits = fp32_logits(model, x, compute)
            for i, target_logits in enumerate(against or [None]):
                sums[name, i - 1 if i else None].add(logits, y, target_logits)
        if run_teacher:
            for i, teacher_part in enumerate(against):
                sums["teacher", i - 1 if i else None].add(teacher_part, y)
        if keep_teacher_logits and t is not None:
            kept.append((pos.cpu(), t.float().cpu()))  # fp32: cached and live metrics match exactly
    # every rank reaches this point, broken or not: all agree before the collective that sums the metrics
    if distributed.max_across(torch.tensor([float(broken is not None)], device=compute.device)).item():
        raise LoaderBroken("evaluation's data loader failed" + (f": {broken}" if broken else " on another rank"))
    return summed(sums, names), (by_position(kept, local_size(loader)) if kept else None)


def summed(sums: dict, names: list[str]) -> dict:
    """{name: metrics} summed across ranks; with ensemble members, metrics["members"] lists each
    member's: agreement and KL for a student, the member's own metrics for the teacher."""
    if not sums:
        return {}
    flat = distributed.sum_across(torch.stack([s.flat() for s in sums.values()]))
    for s, row in zip(sums.values(), flat):
        s.load_flat(row)
    results = {}
    for name in names:
        results[name] = sums[name, None].result()
        parts = [sums[key].result() for key in sums if key[0] == name and key[1] is not None]
        if parts:
            keep = (lambda m: m) if name == "teacher" else (
                lambda m: {k: m[k] for k in ("agreement", "kl") if k in m})
            results[name]["members"] = [keep(m) for m in parts]
    return results


def local_size(loader) -> int:
    """How many samples this rank's pass holds, when its sampler knows (image folders); else 0."""
    try:
        return len(loader.sampler)
    except TypeError:  # an iterable dataset (shards): as many as were seen
        return 0


def by_position(chunks: list, size: int) -> torch.Tensor:
    """[max(size, last position + 1), (1 + members,) classes] logits, row p for the sample at position p; rows of
    samples that could not be read stay NaN."""
    positions = torch.cat([p for p, _ in chunks])
    logits = torch.cat([v for _, v in chunks])
    out = torch.full((max(size, int(positions.max()) + 1), *logits.shape[1:]), float("nan"))
    out[positions] = logits
    return out

