"""`usi soft-labels`: the training data pipeline, exactly as training runs it, through the teacher, for every
epoch, into a store (usi/distill/soft_labels.py). A training run's side of it is usi/training/stored_teacher.py.

The writer builds the very objects `usi train` builds (build_training), so the batches, their mixing and the
teacher are the training run's own: one code path, not a copy of it. Each rank writes its own chunks (run it
under torchrun with the world size the students will use); rank 0 writes the manifest.
"""
from __future__ import annotations

import fcntl
import logging
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from usi.data.loader import next_batch
from usi.distill import soft_labels as store
from usi.errors import UsageError
from usi.recipe import Recipe
from usi.runtime import distributed, files
from usi.runtime.preempt import SIGNALS, Interrupted
from usi.runtime.progress import Progress, setup_logging, step_line
from usi.training.build import Training, build_training
from usi.training.engine import prepare_batch
from usi.training.rundir import check_out
from usi.training.stored_teacher import run_facts

log = logging.getLogger("usi")
LOCK = ".lock"  # in the store's folder: one writer at a time (flock, released when its process ends)


# ---------------------------------------------------------------- writing


def write_store(recipe: Recipe, out: Path, *, top_k: int | None = None, steps_per_chunk: int = 50) -> dict:
    """Writes (or finishes) the store in `out`; returns its manifest."""
    if not recipe.kd:
        raise UsageError("usi soft-labels stores a teacher's outputs: teacher.name is null")
    if recipe.teacher.soft_labels:
        raise UsageError(f"teacher.soft_labels={recipe.teacher.soft_labels!r} reads a store; leave it null to "
                         f"write one")
    if steps_per_chunk < 1:
        raise UsageError(f"--steps-per-chunk={steps_per_chunk}: expected 1 or more")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k {top_k}: expected 1 or more (at most the class count)")
    check_out(out)  # empty, a file, a link to nothing, a file on the way to it: one line each
    dist, lock = distributed.setup(recipe.run.device), None
    try:
        setup_logging(None, dist.main)
        t = build_training(recipe, dist, fresh=True, dry=True)  # no DDP, no compile: the teacher only
        classes = len(t.classes)
        k = classes if top_k is None else top_k
        if not 1 <= k <= classes:
            raise UsageError(f"--top-k {top_k}: expected 1..{classes} (the class count)")
        manifest = {"format": store.FORMAT, "facts": run_facts(t), "classes": classes, "top_k": k,
                    "steps_per_chunk": steps_per_chunk, "complete": False}
        lock = prepare(out, manifest) if dist.main else None  # held to the end: one writer per store
        distributed.barrier()
        if store.read_manifest(out) is None:
            raise UsageError(f"--out {out}: rank {dist.rank} cannot read the manifest rank 0 wrote (a folder every "
                             f"rank shares is needed)")
        with stopping_on_signals() as received:
            written = write_epochs(t, out, k=k, per_chunk=steps_per_chunk, received=received)
        distributed.barrier()
        if dist.main:
            manifest = finish(out, manifest, t)
            log.info(f"soft labels: {out}: {len(manifest['chunks'])} chunks ({written} written now by rank 0), "
                     f"top-{k} of {classes} classes, {manifest['bytes'] / 2**20:.1f} MiB")
        return manifest
    finally:
        if lock is not None:
            lock.close()
        distributed.cleanup()


@contextmanager
def stopping_on_signals():
    """SIGTERM/SIGINT end the pass with one line and 128 + the signal (as a training run): every chunk is
    written atomically with its checksum after it, so the chunks done are kept and the same command
    writes the rest."""
    received = []  # the handler only notes the signal: raising there could land inside a loader's own
                   # try/except (an image's decode) and be taken for a bad image; the pass stops between steps

    def note(signum, _frame):
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def prepare(out: Path, manifest: dict):
    """A new store's manifest, or the same store's (resumed); refuses a folder of anything else, and a store
    another writer holds. Returns the lock (an open file: the lock lasts while it is open)."""
    if store.read_manifest(out) is None and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that holds no soft-label store; give a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created ({e.strerror})") from None
    lock = files.open_own(out / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"--out {out} is being written by another usi soft-labels; wait for it to end") from None
    files.remove_stale_temporaries(out)  # a writer killed mid-write left them; none is at work now
    try:
        write_or_check(out, manifest)
    except BaseException:
        lock.close()
        raise
    return lock


def write_or_check(out: Path, manifest: dict) -> None:
    existing = store.read_manifest(out)
    why = store.damaged(existing) if existing is not None else None
    if why:
        raise UsageError(f"--out {out} holds a store whose manifest.json is damaged ({why}); give a new folder")
    if existing is not None:
        for key in ("classes", "top_k", "steps_per_chunk"):
            if existing[key] != manifest[key]:
                raise UsageError(f"--out {out} holds a store with {key}={existing[key]}, not {manifest[key]}; give "
                                 f"a new folder")
        differ = store.first_difference(existing["facts"], manifest["facts"], fill_fixed=False)
        if differ:
            raise UsageError(f"--out {out} holds a store of other facts ({differ}); give a new folder")
        return  # resumed: chunks already written stay
    store.write_manifest(out, manifest)


def check_stop(received: list) -> None:
    if received:
        name = signal.Signals(received[0]).name
        raise Interrupted(received[0], f"stopped by {name}: the chunks written so far are kept; the same usi "
                                       f"soft-labels command writes the rest")


def write_epochs(t: Training, out: Path, *, k: int, per_chunk: int, received: list = ()) -> int:
    """Every epoch's chunks of this rank that are missing or damaged. An epoch with one to write runs its
    batches from step 0 (mixing each, so every draw is training's), the teacher only where needed."""
    rank, steps, written = t.dist.rank, t.steps, 0
    progress, t0, done_steps = Progress(t.dist.main), time.perf_counter(), 0
    t.state.wrapped.train()  # as in training: its dropout draws (workers=0) are training's
    for epoch in range(t.epochs):
        todo = {s for s in store.chunk_starts(steps, per_chunk)
                if store.chunk_done(out, store.chunk_name(epoch, rank, s)) is None}
        if not todo:
            continue
        batches, pending = t.train_loader.epoch(epoch, 0), []
        for step in range(max(todo) + min(per_chunk, steps - max(todo))):
            check_stop(received)
            batch, error = next_batch(batches)
            if error is not None:
                raise error
            if batch is None:
                raise RuntimeError(f"the training loader ended at epoch {epoch + 1}, step {step} of {steps}")
            x, _ = prepare_batch(t.state, t.cfg, *batch)
            if t.recipe.data.workers == 0:  # the student's draws (dropout, drop path) move the RNG that the next
                with torch.no_grad(), t.cfg.compute.autocast():  # batch's transforms use: make them, as training
                    t.state.wrapped(x)
            first = step - step % per_chunk
            if first not in todo:
                continue
            with t.cfg.compute.autocast():
                pending.append(store.top_k(t.state.teacher(x), k))
            if step + 1 == min(first + per_chunk, steps):
                store.write_chunk(out, store.chunk_name(epoch, rank, first), pending)
                pending, written = [], written + 1
            done_steps += 1
            if done_steps % t.recipe.run.log_interval == 0:
                pace = (time.perf_counter() - t0) / done_steps
                progress.show(step_line({"chunks": written}, epoch=epoch, epochs=t.epochs, step=step + 1,
                                        steps=steps, seconds_per_step=pace))
    progress.done()
    return written


def finish(out: Path, manifest: dict, t: Training) -> dict:
    """Rank 0, after every rank is done: every chunk's checksum into the manifest, marked complete."""
    chunks, size = {}, 0
    for epoch in range(t.epochs):
        for rank in range(t.dist.world):
            for first in store.chunk_starts(t.steps, manifest["steps_per_chunk"]):
                name = store.chunk_name(epoch, rank, first)
                digest = store.chunk_done(out, name)
                if digest is None:
                    raise RuntimeError(f"soft labels: {out / name} is missing or damaged after every rank finished")
                chunks[name], size = digest, size + (out / name).stat().st_size
    manifest = {**manifest, "chunks": chunks, "bytes": size, "complete": True}
    store.write_manifest(out, manifest)
    return manifest
