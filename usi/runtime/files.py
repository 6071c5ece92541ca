"""Weight files: atomic writes, and safe, checked loads.

A file is written to a temporary file in the same directory, flushed to disk, then renamed over the old
one: a crash at any point leaves either the old or the new file, never half of one. Loading uses
weights_only=True (or safetensors), so a file carrying a pickled payload is refused without running
it, and checks the file's checksums, so damaged bytes are refused too. Used by the training checkpoint,
the teacher's weights, evaluation and export alike.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
import pickletools
import stat
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from usi.errors import NOT_REGULAR, UsageError, file_problem
from usi.recipe import parse_yaml

MAX_INFLATION = 16  # a compressed member may hold this many times the whole file's size (weights barely compress)
MIN_INFLATED = 256 << 20  # ... or this many bytes, whichever is more


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over path, flushing file and directory to disk. The temporary
    file is made here (a new name, O_EXCL): write never goes through a link planted at a guessable name; a
    link at `path` itself is replaced, never followed."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        try:
            write(tmp)
        except Exception as e:
            raise write_failure(e, path, tmp) or e
        # safetensors >= 0.8 writes through a private temporary file (mode 0600): give the file the
        # permissions of any other file this user writes, so colleagues can load shared weights.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure(error: Exception, path: Path, tmp: Path) -> UsageError | None:
    """A full disk (or quota) while writing `path`, in one line; None for another failure. safetensors says
    "No space left on device (os error 28)"; torch.save reports a short write as a RuntimeError without
    the errno ("unexpected pos N vs M" from its zip writer, "file write failed", "iostream error"): then
    the space left beside the half-written file tells."""
    message = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        s in message for s in ("No space left on device", "Disk quota exceeded"))
    if not full and any(s in message for s in TORCH_WRITE_FAILURES):
        full = free_bytes(tmp.parent) < (1 << 20)
    if not full:
        return None
    before = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} was there"
    return UsageError(f"disk full while writing {path}; {before}; free some space and run again (a run resumes)")


TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter", "iostream error")


def free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def open_regular(path):
    """`path` opened for reading as a binary file, only if it is a regular file: a named pipe is opened
    without blocking and refused, a device (/dev/zero, behind a link or not) or a folder refused, all with
    their reason (OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(next((reason for test, reason in NOT_REGULAR if test(mode)), "is not a regular file"))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def temporary_beside(path: Path) -> Path:
    """A new empty file beside `path` (.NAME.tmp-XXXX, which remove_stale_temporaries knows), made with O_EXCL
    under a name no one can guess: a writer never follows a link planted at a temporary name."""
    fd, name = tempfile.mkstemp(prefix=f".{Path(path).name}.tmp-", dir=Path(path).parent)
    os.close(fd)
    return Path(name)


def not_own(path: Path, folder: bool = False, in_place: bool = False) -> str | None:
    """Why usi must not write at `path` (None: absent, or a plain file / folder as asked): a symbolic link,
    the wrong kind of thing, or, for a file written in place (`in_place`: appended, not replaced), a hard
    link: writing would reach a file that is not usi's own."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent (or under a file: refused elsewhere)
        return None
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if folder != stat.S_ISDIR(info.st_mode) or not (folder or stat.S_ISREG(info.st_mode)):
        return "is not a folder" if folder else "is not a plain file"
    if in_place and info.st_nlink > 1:
        return f"is a hard link (one of {info.st_nlink} names of one file)"
    return None


def open_own(path: Path, mode: str = "a"):
    """`path` opened to append ("a"), or to read and append ("a+"), created if missing, never through a link
    (O_NOFOLLOW; a hard link is refused too): appended lines stay in usi's own file."""
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        problem = "is a symbolic link" if e.errno == errno.ELOOP else not_own(path)  # a FIFO: ENXIO
        if problem is None:  # a plain file or none: the caller's own message (permissions, a full disk, ...)
            raise
        raise UsageError(f"{path} {problem}; usi writes only its own plain files, never through a link") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise UsageError(f"{path} {not_own(path, in_place=True) or 'is not a plain file'}; usi writes only its "
                         f"own plain files, never through a link")
    return os.fdopen(fd, mode)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Half-written files that a killed writer left in `folder` (atomic_write's, and safetensors' own
    .tmpXXXX): only call while holding the folder's run lock, when no other writer can be at work."""
    stale = [p for p in Path(folder).glob(".*") if p.is_file() and (".tmp-" in p.name or p.name.startswith(".tmp"))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def metadata_problem(recipe_text, classes) -> str | None:
    """What is wrong with the recipe and class list a checkpoint stores (last.pt's keys, or the metadata
    of best.safetensors), or None: the recipe must be YAML sections, the classes a list of names."""
    try:
        tree = parse_yaml(recipe_text, "stored recipe") if isinstance(recipe_text, str) else None
    except UsageError:
        tree = None
    if not isinstance(tree, dict) or not all(isinstance(v, (dict, type(None))) for v in tree.values()):
        return "its stored recipe is not a usi recipe"
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return "its stored class list is not a list of class names"
    return None


def class_difference(theirs: list[str], ours: list[str]) -> str | None:
    """How a class list stored with weights differs from the one they are used with, or None if they are
    the same names in the same order: label i must mean the same class on both sides."""
    if theirs == ours:
        return None
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    at = f"label {first} is {(theirs + ['-'])[first]!r} there and {(ours + ['-'])[first]!r} here"
    if sorted(theirs) == sorted(ours):
        return f"were trained on the same {len(ours)} classes in another order ({at})"
    return f"were trained on other classes ({len(theirs)} there, {len(ours)} here; {at})"


def non_finite(state: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity (the weights of a diverged run)."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def load_state_file(path: Path) -> dict:
    """A dict of tensors (and plain values) from a safetensors or torch file, without running code.

    The format is read off the file's first bytes, not its name. Torch's zip checkpoints carry a
    CRC per member that torch.load never checks; they are checked here, so damaged bytes are refused
    rather than resumed from. Exported safetensors carry a digest of their tensors, checked likewise.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise UsageError(f"checkpoint {path} {problem}")
    kind = file_kind(path)
    if kind == "safetensors":
        return load_safetensors(path)
    if kind == "zip":
        check_zip(path)
    elif kind == "pickle":
        check_legacy_storages(path)
    else:
        what = "a readable safetensors file" if path.suffix == ".safetensors" else "a checkpoint"
        raise UsageError(f"{path} is not {what}: neither a torch file nor safetensors")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"refused to load {path}: it holds objects other than tensors "
                         f"({unpickling_reason(e)})") from None
    except Exception as e:  # the weights-only unpickler raises IndexError, KeyError, ... on damaged input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: {first[:160]})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a dict of weights")
    oversized = next(oversized_tensors(state), None)
    if oversized:
        raise UsageError(f"{path} is not a usable checkpoint: its tensor {oversized} declares more elements than "
                         f"the bytes stored for it")
    return state


def oversized_tensors(value, name: str = ""):
    """Names of the tensors whose shape covers more bytes than their storage holds (zero strides): any
    operation on one (a NaN check, a copy into a model) would allocate its declared size."""
    if isinstance(value, torch.Tensor):
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            yield f"{name or 'tensor'} {tuple(value.shape)}"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from oversized_tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from oversized_tensors(item, f"{name}[{i}]")


def file_kind(path: Path) -> str:
    """safetensors (an 8-byte header length, then JSON), zip (torch >= 1.6), pickle (older torch), or other."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "other"


def check_zip(path: Path, limit: int | None = None) -> None:
    """Each part's checksum, after its declared size: torch.save stores parts as they are, so a part can
    declare more bytes than the file holds only compressed, and is refused past `limit` (default:
    MAX_INFLATION times the file, at least MIN_INFLATED) before anything is inflated."""
    size = path.stat().st_size
    limit = max(MAX_INFLATION * size, MIN_INFLATED) if limit is None else limit
    try:
        with zipfile.ZipFile(path) as archive:
            parts = archive.infolist()
            total = sum(p.file_size for p in parts if p.compress_type != zipfile.ZIP_STORED)
            lying = next((p for p in parts if p.compress_type == zipfile.ZIP_STORED and p.file_size > p.compress_size),
                         None)
            if lying is not None:
                raise UsageError(f"{path} is damaged: its part {lying.filename!r} declares {lying.file_size} bytes "
                                 f"but stores {lying.compress_size}")
            if total > limit:
                raise UsageError(f"refused to load {path}: the compressed parts of its {size}-byte file declare "
                                 f"{total} bytes once inflated (more than {limit}); re-save it with torch.save")
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: {e})") from None
    if bad is not None:
        raise UsageError(f"{path} is damaged: its part {bad!r} fails its checksum; use an earlier copy")


def check_legacy_storages(path: Path) -> None:
    """A file of torch < 1.6 (pickles, then the storages' bytes): torch.load allocates every storage at
    the size its pickle declares before reading its bytes. Each declared element takes at least one
    byte of the file, so declarations past the file's size are refused before torch.load."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, system info
                for _ in pickletools.genops(f):
                    pass
            declared = sum(persistent_storages(f).values())
    except Exception as e:  # not a pickle at all, cut short, ...
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: {str(e)[:120]})") from None
    if declared > size:
        raise UsageError(f"refused to load {path}: its {size}-byte file declares storages of {declared} elements")


def persistent_storages(f) -> dict:
    """{storage key: declared element count} of one pickle's ('storage', type, key, location, numel, ...)
    persistent ids, read by following its opcodes' effect on the stack (nothing is run or built)."""
    stack, memo, storages = [], {}, {}
    for op, arg, _ in pickletools.genops(f):
        before, after = op.stack_before, op.stack_after
        if op.name == "MARK":
            stack.append(pickletools.markobject)
            continue
        if pickletools.markobject in before:  # TUPLE, DICT, APPENDS, ...: everything above the mark, and below it
            mark = len(stack) - 1 - stack[::-1].index(pickletools.markobject)
            items, below = stack[mark + 1:], before.index(pickletools.markobject)
            del stack[mark - below:]
            stack += [tuple(items) if op.name == "TUPLE" else None] * len(after)
            continue
        popped = stack[len(stack) - len(before):] if before else []
        del stack[len(stack) - len(before):]
        if op.name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            stack.append(tuple(popped))
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1] if stack else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        else:
            pid = popped[0] if op.name == "BINPERSID" and popped else None
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
                storages[pid[2]] = max(pid[4], 0)
            stack += [arg if op.arg is not None and len(after) == 1 else None] * len(after)
    return storages


def unpickling_reason(error: Exception) -> str:
    """The line of torch's long weights-only message that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "global" in line.lower()]
    return (named or lines or [type(error).__name__])[0][:200]


def load_safetensors(path: Path) -> dict:
    try:
        state = load_file(str(path))
        expected = read_metadata(path).get("sha256")
    except Exception as e:  # SafetensorError, OSError, a header that is not JSON, ...
        raise UsageError(f"{path} is not a readable safetensors file ({str(e)[:160]})") from None
    if expected is not None and tensor_digest(state) != expected:
        raise UsageError(f"{path} is damaged: its tensors do not match the digest written with them")
    return state


def tensor_digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        h.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def mismatch(model: torch.nn.Module, state: dict) -> str:
    """Why `state` does not load into `model`, in one line: missing and unexpected keys, shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for name, items in (("shapes differ (file vs model)", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - 2} more)" if len(items) > 2 else ""
            parts.append(f"{name}: {', '.join(items[:2])}{more}")
    return "; ".join(parts) or "unknown mismatch"


def export_weights(state_dict: dict, path: Path, metadata: dict[str, str]) -> None:
    """The student's weights as safetensors: what leaves the program, and what a teacher loads."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {**metadata, "sha256": tensor_digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def json_safe(value):
    """NaN and infinity as null: json.dumps would write bare NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
