"""Stored soft labels: the teacher's logits for the exact batches online KD would show it, on disk.

Every random draw of a training run derives from (seed, epoch, rank, step), so students that share the facts
below (data, seed, batch layout, augmentation, mixing, teacher) see the same mixed batches, and the teacher's
outputs on them are the same: `usi soft-labels` stores them once (usi/training/soft_label_pass.py), and
`teacher.soft_labels=DIR` trains from them. Unlike FKD, ReLabel or ml-dr, the student's stream does not
change: step s of epoch e on rank r reads the logits of the batch it is about to train on.

Layout of DIR:
  manifest.json                      the facts, top_k, class count, steps per chunk and, once complete, every
                                     chunk's sha256
  e{epoch}-r{rank}-s{step}.safetensors   the steps [step, step + steps_per_chunk) of one (epoch, rank):
                                     values [rows, K] fp32 (the top-K logits, largest first), indices [rows, K]
                                     (int16 up to 32767 classes), lse [rows] fp32 (log-sum-exp of ALL logits)
  <chunk>.sha256                     written after its chunk (both atomically): a chunk with a matching one is
                                     done, so a killed writer resumes at the first missing or damaged chunk

The tail: with K < C the top-K probabilities are exact (exp(value - lse)); the other C - K classes share the
remaining mass 1 - sum(top-K) uniformly. The logits handed to the loss are those of that distribution, so the
KD loss is unchanged code. With K = C they are the teacher's logits, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from usi.errors import UsageError
from usi.runtime.files import atomic_write

log = logging.getLogger("usi")

FORMAT = "usi soft labels v1"
# Facts that change the teacher's input only by the float rounding of the normalization bridge, once the
# RandAugment fill is a recipe fact: a student of another normalization may read the store.
ROUNDING_ONLY = ("normalization.mean", "normalization.std")


# ---------------------------------------------------------------- the facts


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_digest(split) -> str:
    """The training split's files: relative paths, labels and sizes (folders), or shard names and counts."""
    h = hashlib.sha256(" ".join(split.classes).encode() + b"\n")
    samples = getattr(split, "samples", None)
    if samples is not None:
        root = Path(split.root) if hasattr(split, "root") else None
        for path, label in samples:
            name = str(Path(path).relative_to(root)) if root is not None else str(path)
            h.update(f"{name} {label} {Path(path).stat().st_size}\n".encode())
    else:
        for url, count in zip(split.urls, split.counts):
            h.update(f"{Path(url).name} {count}\n".encode())
    return h.hexdigest()


def teacher_identity(cfg) -> dict:
    weights = f"sha256:{sha256_file(Path(cfg.weights))}" if cfg.weights else "timm-pretrained"
    return {"name": cfg.name, "weights": weights, "input_size": cfg.input_size, "fold_bn": cfg.fold_bn,
            "kwargs": dict(cfg.kwargs)}


def facts(recipe, *, files: str, spec, fill: tuple, on_device: bool, world: int, steps, epochs: int, compute,
          identity=teacher_identity) -> dict:
    """Every fact that decides the teacher's input and output at each (epoch, rank, step), by recipe key.
    files: data_digest of the training split; identity(teacher cfg): who the teacher is. `usi table` plans
    with stand-ins for these and for steps (usi/studies/shared_store.py), before any file exists."""
    a, teachers = recipe.aug, recipe.teachers()
    found = {
        "data.files": files, "data.format": recipe.data.format, "run.seed": recipe.run.seed,
        "epochs": epochs, "steps_per_epoch": steps, "aug.repeats": a.repeats, "data.input_size": spec.size,
        "normalization.mean": list(spec.mean), "normalization.std": list(spec.std),
        "aug.randaugment_fill": [round(255 * v) for v in fill],
        "aug.randaugment_on": "device" if on_device else "workers", "data.workers": recipe.data.workers,
        "optim.global_batch": recipe.optim.global_batch, "processes": world, "data.batch_size": recipe.data.batch_size,
        "teacher": identity(teachers[0]), "teacher.extra": [identity(t) for t in teachers[1:]],
        "precision": f"{compute.device.type} {compute.amp_dtype} channels_last={compute.channels_last}",
    }
    for key in ("scale", "ratio", "interpolation", "hflip", "auto_augment", "color_jitter", "re_prob", "mixup_alpha",
                "cutmix_alpha", "mixup_prob", "mixup_switch_prob", "mixup_mode"):
        found[f"aug.{key}"] = getattr(a, key)
    if recipe.data.workers == 0:  # transforms share the main process's RNG with the student's dropout/drop path
        m = recipe.model
        found["student"] = {"name": m.name, "drop_path_rate": m.drop_path_rate, "kwargs": dict(m.kwargs)}
    if len(teachers) > 1:  # an ensemble's logits depend on how it combines, and at which temperature
        found["teacher.combine"] = recipe.teacher.combine
        found["loss.temperature"] = recipe.loss.temperature
    return json.loads(json.dumps(found))  # as the manifest holds them (tuples as lists)


def first_difference(stored: dict, live: dict, *, fill_fixed: bool) -> str | None:
    """The first key whose value differs, in words; None when the store serves this run."""
    for key in sorted(set(stored) | set(live)):
        if key in ROUNDING_ONLY and fill_fixed:
            continue
        if stored.get(key) != live.get(key):
            return f"{key}: the store has {short(stored.get(key))}, this run {short(live.get(key))}"
    return None


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- the manifest and chunks


def chunk_name(epoch: int, rank: int, step: int) -> str:
    return f"e{epoch:04d}-r{rank:03d}-s{step:06d}.safetensors"


CHUNK = re.compile(r"e\d{4,}-r\d{3,}-s\d{6,}\.safetensors")
SHA256 = re.compile(r"[0-9a-f]{64}")


def damaged(manifest: dict) -> str | None:
    """What makes a manifest unusable (a hand edit, another tool's file), in words; None when it is sound."""
    for key in ("classes", "top_k", "steps_per_chunk"):
        value = manifest.get(key)
        if type(value) is not int or value < 1:
            return f"{key} is {short(value)}, not a whole number of 1 or more"
    if manifest["top_k"] > manifest["classes"]:
        return f"top_k {manifest['top_k']} exceeds its {manifest['classes']} classes"
    if not isinstance(manifest.get("facts"), dict):
        return "it records no facts"
    if not isinstance(manifest.get("facts", {}).get("data.batch_size"), int):
        return "its facts hold no batch size"
    if manifest.get("complete") not in (True, False):
        return f"complete is {short(manifest.get('complete'))}, not true or false"
    chunks = manifest.get("chunks", {})
    if not isinstance(chunks, dict) or not all(isinstance(n, str) and CHUNK.fullmatch(n) and isinstance(d, str)
                                               and SHA256.fullmatch(d) for n, d in chunks.items()):
        return "its chunks are not a list of chunk names and checksums"
    expected = expected_chunks(manifest)
    if manifest["complete"] is True and set(chunks) != expected:
        return f"it lists {len(chunks)} chunks where its facts and steps_per_chunk make {len(expected)}"
    return None


def expected_chunks(manifest: dict) -> set[str]:
    """Every chunk a complete store of these facts holds: epochs x processes x chunk starts."""
    f = manifest["facts"]
    epochs, world, steps = f.get("epochs"), f.get("processes"), f.get("steps_per_epoch")
    if not all(type(v) is int and v >= 1 for v in (epochs, world, steps)):
        return set()
    return {chunk_name(e, r, s) for e in range(epochs) for r in range(world)
            for s in chunk_starts(steps, manifest["steps_per_chunk"])}


def chunk_starts(steps: int, per_chunk: int) -> list[int]:
    return list(range(0, steps, per_chunk))


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(folder / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))


def index_dtype(classes: int) -> torch.dtype:
    return torch.int16 if classes <= 32767 else torch.int32


def top_k(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """One step's stored form of the teacher's logits [B, C] (fp32 whatever the autocast dtype)."""
    logits = logits.float()
    values, indices = logits.topk(k, dim=1)
    return {"values": values.cpu(), "indices": indices.to(index_dtype(logits.shape[1])).cpu(),
            "lse": torch.logsumexp(logits, dim=1).cpu()}


def write_chunk(folder: Path, name: str, steps: list[dict]) -> str:
    """The steps' stored forms as one chunk, then its checksum beside it; returns the sha256."""
    payload = save_bytes({key: torch.cat([s[key] for s in steps]).contiguous() for key in steps[0]})
    digest = hashlib.sha256(payload).hexdigest()
    atomic_write(folder / name, lambda tmp: Path(tmp).write_bytes(payload))
    atomic_write(folder / f"{name}.sha256", lambda tmp: Path(tmp).write_text(digest + "\n"))
    return digest


def chunk_done(folder: Path, name: str) -> str | None:
    """The chunk's sha256 when it is complete and intact, else None (to be written again)."""
    try:
        digest = (folder / f"{name}.sha256").read_text().strip()
        return digest if sha256_file(folder / name) == digest else None
    except OSError:
        return None


def read_chunk(folder: Path, name: str, digest: str) -> dict[str, torch.Tensor]:
    try:
        payload = (folder / name).read_bytes()
    except OSError as e:
        raise UsageError(f"soft-label store {folder}: {name} cannot be read ({e.strerror}); run the same usi "
                         f"soft-labels again to write it") from None
    if hashlib.sha256(payload).hexdigest() != digest:
        raise UsageError(f"soft-label store {folder}: {name} does not match its checksum (damaged); write the store "
                         f"again with usi soft-labels")
    return load_bytes(payload)


def full_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, classes: int) -> torch.Tensor:
    """[rows, C] logits whose softmax has the stored top-K probabilities exactly and spreads the rest of the
    mass uniformly over the other classes; with K = C, the stored logits themselves."""
    rows, k = values.shape
    indices = indices.long()
    if k == classes:
        return values.new_empty(rows, classes).scatter_(1, indices, values)
    top = torch.exp(values.double() - lse.double()[:, None]).sum(1)
    tail = (1.0 - top).clamp_min(1e-30)  # a teacher this sure leaves nothing to spread (float rounding aside)
    rest = (lse.double() + tail.log() - math.log(classes - k)).float()
    return rest[:, None].expand(rows, classes).contiguous().scatter_(1, indices, values)


# ---------------------------------------------------------------- reading


def open_store(folder: Path, live: dict, *, classes: int, fill_fixed: bool) -> dict:
    """The manifest of a complete store written for this run's facts; refuses anything else in one line."""
    manifest = read_manifest(folder)
    key = f"teacher.soft_labels={folder}"
    if manifest is None:
        raise UsageError(f"{key} holds no readable manifest.json of a soft-label store; write one with usi soft-labels")
    why = damaged(manifest)
    if why:
        raise UsageError(f"{key}: its manifest.json is damaged ({why}); write the store again with usi soft-labels")
    if manifest["complete"] is not True:
        raise UsageError(f"{key} is incomplete (its writer stopped); run the same usi soft-labels again to finish it")
    if manifest["classes"] != classes:
        raise UsageError(f"{key} stores {manifest['classes']} classes, the dataset has {classes}")
    differ = first_difference(manifest["facts"], live, fill_fixed=fill_fixed)
    if differ:
        raise UsageError(f"{key} was written for other batches or another teacher: {differ}")
    missing = [n for n in manifest["chunks"] if not (folder / n).is_file()]
    if missing:  # before any step trains: found mid-run it would stop the run an epoch in
        raise UsageError(f"{key} lacks {len(missing)} of its {len(manifest['chunks'])} chunks ({missing[0]} first); "
                         f"run the same usi soft-labels again to write them")
    return manifest


class StoredLabels:
    """Answers for the teacher in the training step: the logits stored for (epoch, rank, step), one step per
    call, on the batch's device. Told where each epoch starts (`follow`'s loader); an epoch resumed mid-way
    on a loader that seeks (image folders reseed from the resumed step, a stream the store does not hold) is
    answered by the live teacher instead, so the run equals the live one."""

    def __init__(self, folder: Path, manifest: dict, *, rank: int, teacher):
        self.folder, self.manifest, self.rank, self.teacher = folder, manifest, rank, teacher
        self.per_chunk, self.classes = manifest["steps_per_chunk"], manifest["classes"]
        self.epoch, self.step, self.live = 0, 0, False
        self.loaded, self.chunk = None, None
        self.read_s = 0.0  # seconds spent reading, checking and rebuilding logits: the store's cost in a run

    def start(self, epoch: int, step: int, *, replays: bool) -> None:
        self.epoch, self.step = epoch, step
        self.live = step > 0 and not replays
        if self.live:
            log.info(f"soft labels: epoch {epoch + 1} resumes at step {step}, which the loader reseeds; the live "
                     f"teacher serves the rest of this epoch")

    def logits_at(self, epoch: int, step: int) -> torch.Tensor:
        t0 = time.perf_counter()
        first = step - step % self.per_chunk
        name = chunk_name(epoch, self.rank, first)
        if self.loaded != name:
            digest = self.manifest["chunks"].get(name)
            if digest is None:
                raise UsageError(f"soft-label store {self.folder} has no {name}")
            chunk = read_chunk(self.folder, name, digest)
            if chunk.get("values") is None or chunk["values"].shape[1:] != (self.manifest["top_k"],):
                raise UsageError(f"soft-label store {self.folder}: {name} does not hold top-{self.manifest['top_k']} "
                                 f"rows as its manifest.json says (a hand edit); write the store again")
            self.chunk, self.loaded = chunk, name
        rows = self.manifest["facts"]["data.batch_size"]  # every training step is a full batch
        at = (step - first) * rows
        c = self.chunk
        logits = full_logits(c["values"][at:at + rows], c["indices"][at:at + rows], c["lse"][at:at + rows],
                             self.classes)
        self.read_s += time.perf_counter() - t0
        return logits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.live:
            return self.teacher(x)
        logits = self.logits_at(self.epoch, self.step)
        self.step += 1
        if logits.shape[0] != x.shape[0]:
            raise RuntimeError(f"soft labels: {logits.shape[0]} stored rows for a batch of {x.shape[0]}")
        return logits.to(x.device, non_blocking=True)

    def follow(self, loader) -> "Positioned":
        return Positioned(loader, self)


class Positioned:
    """The training loader, telling the store where each epoch starts."""

    def __init__(self, loader, labels: StoredLabels):
        self.loader, self.labels = loader, labels

    def epoch(self, epoch: int, start_step: int = 0):
        self.labels.start(epoch, start_step, replays=not self.loader.seeks)
        return self.loader.epoch(epoch, start_step)

    def __getattr__(self, name):
        return getattr(self.loader, name)
