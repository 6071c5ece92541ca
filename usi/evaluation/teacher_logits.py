"""The teacher's validation logits, computed once and cached on disk.

Validation is deterministic (center crop), so the teacher's logits on it depend only on the teacher's
weights, the split's files and its eval transform (the val loader's view's cache identity), the
normalization bridge, and the precision and device of the pass. The cache key hashes all of them; a
change of any one gives a new key. Every later evaluation of every student then costs one student forward.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from usi.distill.teacher import Ensemble
from usi.evaluation.evaluate import evaluate
from usi.models import Compute
from usi.runtime import distributed, files


def cache_dir() -> Path:
    # an empty USI_CACHE is unset (the default), never the current directory; "~" is the home folder
    return Path(os.environ.get("USI_CACHE") or Path.home() / ".cache" / "usi").expanduser() / "teacher-logits"


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # USI_CACHE inside a file: "Not a directory"
        return False


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(teacher_cfgs: list, combine: str, *, split_identity: str, teacher, compute: Compute) -> str:
    """teacher_cfgs: the recipe's teachers (one, or an ensemble's members in order); teacher: the built one."""
    h = hashlib.sha256(b"usi teacher logits v3 (fp32 head, ensembles)\n")
    members = teacher.members if isinstance(teacher, Ensemble) else [teacher]
    for cfg, member in zip(teacher_cfgs, members, strict=True):
        weights = cfg.weights
        h.update(f"teacher {cfg.name} {file_digest(Path(weights)) if weights else 'timm-pretrained'} "
                 f"{cfg.input_size} {cfg.fold_bn} {sorted(cfg.kwargs.items())}\n".encode())
        h.update(f"bridge {member.scale.flatten().tolist()} {member.shift.flatten().tolist()}\n".encode())
    if len(members) > 1:
        h.update(f"combine {combine}\n".encode())
    h.update(f"split {split_identity}\n".encode())
    # The teacher pass's precision and layout change its logits' last bits (bf16: more than that).
    h.update(f"compute {compute.device.type} {compute.amp_dtype} {compute.channels_last}\n".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Cached:
    """What the cache did, truthfully: hit, or computed and then stored or not (and why not)."""
    hit: bool
    note: str  # "from the cache", "computed and cached", "computed; not cached: <why>"


def teacher_val_logits(teacher, recipe, split, loader, *, compute: Compute, n_bins: int,
                       dist: distributed.Dist) -> tuple[dict, torch.Tensor, Cached]:
    """(the teacher's val metrics, this rank's logits in loader order, what the cache did).

    `split` is the val split that `loader` reads; a view (`loader.dataset`) without a cache identity is not
    cached. An
    ensemble is cached as one entry: its combined logits and each member's ([N, 1 + M, C]). The metrics
    carry the teacher's name, and each member's ("a + b" for an ensemble).
    """
    metrics, logits, cached = cached_or_computed(teacher, recipe, split, loader, compute=compute, n_bins=n_bins,
                                                 dist=dist)
    names = [t.name for t in recipe.teachers()]
    metrics["name"] = " + ".join(names)
    for member, name in zip(metrics.get("members", []), names):
        member["name"] = name
    return metrics, logits, cached


def cached_or_computed(teacher, recipe, split, loader, *, compute: Compute, n_bins: int,
                       dist: distributed.Dist) -> tuple[dict, torch.Tensor, Cached]:
    identity = loader.dataset.cache_identity()  # the view the loader reads: its files and transform
    if identity is None:
        results, mine = evaluate({}, loader, compute, n_bins=n_bins, teacher=teacher, keep_teacher_logits=True)
        return results["teacher"], mine, Cached(False, "computed; shards are not cached")
    key = cache_key(recipe.teachers(), recipe.teacher.combine, split_identity=identity, teacher=teacher,
                    compute=compute)
    path = cache_dir() / f"{key}.pt"
    if is_file(path):
        try:
            state = files.load_state_file(path)
            full = state["logits"]
            if full.shape[0] == len(split):
                return state_metrics(state), full[dist.rank::dist.world].clone(), Cached(True, "from the cache")
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    results, mine = evaluate({}, loader, compute, n_bins=n_bins, teacher=teacher, keep_teacher_logits=True)
    if distributed.max_across(torch.tensor([int(mine is None)], device=dist.device)).item():
        return results["teacher"], mine, Cached(False, "computed; not cached: a process read no val image")
    # Assemble the full [N, C] tensor: each rank fills its rows (rank::world), a sum joins them.
    full = torch.zeros(len(split), *mine.shape[1:], device=dist.device)
    full[dist.rank::dist.world] = mine.to(dist.device)
    full = distributed.sum_across(full).cpu()
    note = "computed and cached"
    if dist.main:
        metrics = json.dumps(results["teacher"])  # a string: weights_only loads it back
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write(path, lambda tmp: torch.save({"logits": full, "metrics": metrics}, tmp))
        except OSError as e:  # the cache only saves time: a run never fails for it (the note says so)
            note = f"computed; not cached: {path.parent} is not writable ({e.strerror}); set USI_CACHE to one that is"
    return results["teacher"], mine, Cached(False, note)


def state_metrics(state: dict) -> dict:
    metrics = json.loads(state["metrics"])
    if not isinstance(metrics, dict) or not isinstance(metrics.get("count"), int):
        raise ValueError("damaged cache entry")
    return metrics
