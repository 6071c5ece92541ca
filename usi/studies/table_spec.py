"""A table file: what `usi table FILE` trains, as data, checked before anything runs.

    recipe: quickstart              # a built-in recipe name or a path
    overrides: {data.root: /data/imagenette, sched.epochs: 20}   # every run
    teacher: {name: resnet50, overrides: {sched.epochs: 60}}     # optional: trained first, by this table
    models:
      - resnet18
      - {name: vit_tiny_patch16_224, overrides: {model.kwargs: {patch_size: 4, img_size: 32}}, expect: 75.0}
    kd: both                        # on | off | both
    seeds: [0, 1, 2]
    jobs: 2                         # runs at once on this machine
    nproc: 1                        # processes (GPUs) per run
    out: runs/tables/example
    tolerance: 1.0                  # a row whose top-1 is this far under its `expect` is flagged
    share_teacher: true             # one soft-label store per seed for the KD rows (usi/studies/shared_store.py)
    top_k: 100                      # logits the store keeps per sample; default: all classes (exact)

Every row runs the same recipe; a model's own overrides that change more than its architecture
(model.name, model.kwargs other than drop rates) are allowed, and the table shows them as deviations.
Run directories: <out>/teacher, <out>/seed<S>/<label>-kd and <label>-nokd (and <out>/seed<S>/soft-labels).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from usi import recipe as recipe_mod
from usi.errors import UsageError, shorten, suggest
from usi.studies import shared_store
from usi.studies.jobs import Job, settings
from usi.training.checkpoint import BEST

KINDS = {"both": (False, True), "on": (True,), "off": (False,)}
# The baseline drops the teacher, the ensemble and feature KD; nothing else changes.
BASELINE = {"teacher.name": None, "teacher.extra": [], "features.student": None, "features.teacher": None}
KEYS = {"recipe", "overrides", "teacher", "models", "kd", "seeds", "jobs", "nproc", "out", "tolerance", "title",
        "share_teacher", "top_k"}
MODEL_KEYS = {"name", "label", "overrides", "expect"}
# Architecture, not training: a row may set these without leaving the shared recipe.
ARCHITECTURE = {"model.name", "model.kwargs"}
# What the table sets in each run: a row or an override that set them would make two seeds one run, or
# a row's teacher another than the table's.
TABLE_OWNS = {"run.seed", "run.dir", "run.resume", "model.name"}
LABEL = re.compile(r"(?![.])[A-Za-z0-9._+=-]{1,100}")
REGULARIZERS = {"drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate"}


@dataclass
class Row:
    """One model of the table: its label (unique), timm name, own overrides and expected top-1."""
    label: str
    name: str
    overrides: dict = field(default_factory=dict)
    expect: float | None = None


@dataclass
class TableSpec:
    recipe: str
    rows: list[Row]
    overrides: dict = field(default_factory=dict)
    teacher: Row | None = None
    kd: str = "both"
    seeds: list[int] = field(default_factory=lambda: [0])
    jobs: int = 1
    nproc: int = 1
    out: Path = Path("runs/table")
    tolerance: float = 1.0
    title: str = ""
    share_teacher: bool = False
    top_k: int | None = None  # None: every class


def fail(where: str, message: str) -> None:
    raise UsageError(f"{where}: {message}")


def dotted(where: str, value) -> dict:
    """`overrides:` as {section.key: value}; a nested mapping is flattened one level (section: {key: v})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(where, f"overrides must be a mapping of section.key: value, not {type(value).__name__}")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str):
            fail(where, f"override key {key!r} is not text")
        if "." not in key and isinstance(v, dict):
            out.update({f"{key}.{k}": x for k, x in v.items()})
        else:
            out[key] = v
    return out


def positive_int(where: str, value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(where, f"{name} must be a whole number >= 1, not {shorten(repr(value), 80)}")
    return value


def model_row(where: str, entry) -> Row:
    if isinstance(entry, str):
        return Row(entry, entry)
    if not isinstance(entry, dict):
        fail(where, f"a model is a timm name or {{name: ..., overrides: ...}}, not {shorten(repr(entry), 80)}")
    unknown = sorted(set(entry) - MODEL_KEYS)
    if unknown:
        fail(where, f"unknown key {unknown[0]!r}{suggest(unknown[0], MODEL_KEYS)} (keys: {', '.join(sorted(MODEL_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        fail(where, "a model needs a name (a timm model name)")
    label = entry.get("label", name)
    if not isinstance(label, str) or not LABEL.fullmatch(label):
        fail(where, f"label {shorten(repr(label), 80)} must be a plain name of letters, digits and . _ + = - (it "
                    f"names run folders and launch commands), not starting with '.', at most 100 characters")
    expect = entry.get("expect")
    if expect is not None and not finite_number(expect):
        fail(where, f"expect must be a top-1 in percent, not {shorten(repr(expect), 80)}")
    overrides = dotted(f"{where} ({label})", entry.get("overrides"))
    owned = sorted(k for k in overrides if k in TABLE_OWNS or k.startswith("teacher."))
    if owned:
        fail(where, f"{label}: overrides: {owned[0]} is the table's to set (seeds:, teacher:, name:), not a row's")
    return Row(label, name, overrides, expect)


def finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_seeds(where: str, seeds) -> list[int]:
    """Distinct whole numbers >= 0: a seed listed twice would count one run as two."""
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        fail(where, f"seeds must be distinct whole numbers >= 0, not {shorten(repr(seeds), 80)}")
    return list(seeds)


def check_owned(where: str, overrides) -> None:
    """Keys the table sets for each run itself may not come from the shared overrides."""
    keys = overrides.keys() if isinstance(overrides, dict) else [str(o).split("=", 1)[0] for o in overrides]
    owned = sorted(k for k in keys if k in TABLE_OWNS)
    if owned:
        fail(where, f"{owned[0]} is the table's to set for each run (seeds:, models:, out:), not an override")


def from_mapping(tree, where: str) -> TableSpec:
    """A TableSpec from a table file's parsed YAML; every mistake is one line naming the key."""
    if not isinstance(tree, dict):
        fail(where, "a table file is a mapping (recipe:, models:, ...)")
    unknown = sorted(set(tree) - KEYS)
    if unknown:
        fail(where, f"unknown key {unknown[0]!r}{suggest(unknown[0], KEYS)} (keys: {', '.join(sorted(KEYS))})")
    if not isinstance(tree.get("recipe"), str):
        fail(where, "recipe: names the shared recipe (a built-in name such as quickstart, or a path)")
    models = tree.get("models")
    if not isinstance(models, list) or not models:
        fail(where, "models: lists at least one model (a timm name, or {name: ..., overrides: ...})")
    rows = [model_row(f"{where} models[{i}]", m) for i, m in enumerate(models)]
    labels = [r.label for r in rows]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice:
        fail(where, f"model {twice!r} is listed twice; give one of them a label: to tell their rows apart")
    seeds = check_seeds(where, tree.get("seeds", [0]))
    kd = tree.get("kd", "both")
    kd = {True: "on", False: "off"}.get(kd, kd) if isinstance(kd, bool) else kd  # YAML reads a bare on/off as true/false
    if not isinstance(kd, str) or kd not in KINDS:
        fail(where, f"kd must be one of on, off, both, not {shorten(repr(kd), 80)}")
    tolerance = tree.get("tolerance", 1.0)
    if not finite_number(tolerance) or tolerance < 0:
        fail(where, f"tolerance must be a number of top-1 points >= 0, not {shorten(repr(tolerance), 80)}")
    teacher = tree.get("teacher")
    if teacher is not None:
        teacher = model_row(f"{where} teacher", {"name": teacher} if isinstance(teacher, str) else teacher)
        teacher.label = "teacher"
    out = tree.get("out", f"runs/tables/{Path(where).stem}")
    if not isinstance(out, str) or not out or "\0" in out:
        fail(where, f"out must be a folder path, not {shorten(repr(out), 80)}")
    check_owned(where, dotted(where, tree.get("overrides")))
    title = tree.get("title", "")
    share = tree.get("share_teacher", False)
    if not isinstance(share, bool):
        fail(where, f"share_teacher must be true or false, not {shorten(repr(share), 80)}")
    top_k = tree.get("top_k")
    if top_k is not None:
        top_k = positive_int(where, top_k, "top_k")
        if not share:
            fail(where, "top_k sizes the shared soft-label store: it needs share_teacher: true")
    return TableSpec(share_teacher=share, top_k=top_k, recipe=tree["recipe"], rows=rows,
                     overrides=dotted(where, tree.get("overrides")), teacher=teacher, kd=kd, seeds=list(seeds), out=Path(out), tolerance=float(tolerance),
                     jobs=positive_int(where, tree.get("jobs", 1), "jobs"),
                     nproc=positive_int(where, tree.get("nproc", 1), "nproc"), title=str(title))


def load(path: Path) -> TableSpec:
    return from_mapping(recipe_mod.read_yaml(path, "table file"), str(path))


def deviations(row: Row) -> dict:
    """The row's overrides that change the shared recipe beyond the architecture: {key: value}."""
    out = {k: v for k, v in row.overrides.items() if k not in ARCHITECTURE}
    kwargs = row.overrides.get("model.kwargs") or {}
    if isinstance(kwargs, dict):
        out.update({f"model.kwargs.{k}": v for k, v in kwargs.items() if k in REGULARIZERS})
    return out


def run_name(row: Row, kd: bool, seed: int) -> str:
    return f"seed{seed}/{row.label}-{'kd' if kd else 'nokd'}"


def teacher_settings(spec: TableSpec) -> dict:
    """What a KD row sets to use the table's own teacher: its name, architecture and best weights."""
    if spec.teacher is None or spec.kd == "off":
        return {}
    kwargs = spec.teacher.overrides.get("model.kwargs") or {}
    return {"teacher.name": spec.teacher.name, "teacher.weights": str(spec.out / "teacher" / BEST),
            "teacher.kwargs": kwargs, "teacher.extra": []}


def plan(spec: TableSpec, extra: list[str] = ()) -> list[Job]:
    """Every run of the table: the teacher first (when the table trains it), then per seed and model
    the runs that --kd asks for. extra: `section.key=value` from the command line, for every run."""
    base = recipe_mod.read_yaml(recipe_mod.recipe_path(spec.recipe))
    todo = []
    if spec.teacher is not None and spec.kd != "off":
        layers = [spec.overrides, list(extra), {"run.seed": spec.seeds[0]}, spec.teacher.overrides,
                  {"model.name": spec.teacher.name}, BASELINE]
        tree = settings(base, *layers)
        todo.append(Job("teacher", tree))
    needs = ("teacher",) if todo else ()
    for seed in spec.seeds:
        runs = []
        for row in spec.rows:
            for kd in KINDS[spec.kd]:
                kd_layer = teacher_settings(spec) if kd else BASELINE
                layers = [spec.overrides, list(extra), {"run.seed": seed}, row.overrides, {"model.name": row.name},
                          kd_layer]
                tree = settings(base, *layers)
                runs.append(Job(run_name(row, kd, seed), tree, needs=needs if kd else ()))
        if spec.share_teacher:  # the store first: the KD rows that read it wait for it
            kd_runs = [j for j in runs if j.name.endswith("-kd")]
            store = shared_store.share(kd_runs, seed=seed, nproc=spec.nproc, top_k=spec.top_k,
                                       folder=spec.out / f"seed{seed}" / shared_store.STORE)
            todo += [store] if store else []
        todo += runs
    return todo
