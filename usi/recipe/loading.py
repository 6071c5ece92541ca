"""Loading a recipe: YAML (a file, or the copy a checkpoint stores), dotted overrides, typed sections.

`load` and `from_tree` return a recipe that usi/recipe/checking.py has validated.
"""
from __future__ import annotations

import copy
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from usi.errors import UsageError, file_problem, quote, shorten, suggest
from usi.recipe.checking import validate
from usi.recipe.schema import MEMBER_KEYS, SECTIONS, Recipe, TeacherSection, check_field, fields_of

PACKAGE = Path(__file__).resolve().parent.parent
# An installed wheel carries the recipes inside the package (setup.py copies them); a checkout, or an
# editable install, reads them from recipes/ beside the package.
RECIPES = PACKAGE / "recipes" if (PACKAGE / "recipes").is_dir() else PACKAGE.parent / "recipes"


def recipe_path(name: str) -> Path:
    """A recipe file, or the name of a built-in one (`usi`, `quickstart`)."""
    path = Path(name)
    if os.path.isfile(path) or path.suffix in (".yaml", ".yml") or (os.path.exists(path) and not os.path.isdir(path)):
        return path
    builtin = RECIPES / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    raise UsageError(f"recipe {quote(name)} is neither a file nor a built-in recipe "
                     f"({', '.join(sorted(p.stem for p in RECIPES.glob('*.yaml')))})")


def load(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """A recipe from a YAML file (or the defaults) plus `section.key=value` overrides, validated."""
    return from_tree(read_yaml(Path(path)) if path is not None else {}, overrides)


def from_tree(tree: dict, overrides: list[str] = ()) -> Recipe:
    """A validated recipe from parsed YAML (e.g. one stored in a checkpoint) plus overrides."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    recipe = from_dict(tree)
    validate(recipe)
    return recipe


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice: plain YAML keeps the last one and silently drops the first
    (a second `optim:` section would replace the whole first one). Aliases are refused too: a recipe has
    no use for them, and nested aliases ("billion laughs") expand a few lines into gigabytes, which a
    checkpoint's stored recipe could carry."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise UsageError(f"YAML aliases (*name) are not allowed in a recipe (line {mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UsageError(f"duplicate key {quote(key)} at line {key_node.start_mark.line + 1}; "
                                 f"a second one would silently replace the first")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, kind: str = "recipe") -> dict:
    """A recipe file (or another usi YAML file: kind names it in the errors) as its tree."""
    problem = file_problem(path)
    if problem:
        named = kind if kind.endswith("file") else f"{kind} file"  # "table file", not "table file file"
        raise UsageError(f"{named} {shorten(str(path), 200)} {problem}")
    if path.stat().st_size > MAX_RECIPE_BYTES:  # not read: a recipe is a few kB
        raise UsageError(f"{kind} {path} is {path.stat().st_size} bytes; a recipe is a few kB")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{kind} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"{kind} {path} cannot be read ({e.strerror})") from None
    return parse_yaml(text, f"{kind} {path}")


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few kB; a checkpoint's metadata could hold anything


def parse_yaml(text: str, what: str) -> dict:
    """A recipe's text (a file, or the copy stored in a checkpoint) as its tree of sections."""
    if len(text) > MAX_RECIPE_BYTES:
        raise UsageError(f"{what} is {len(text)} bytes; a recipe is a few kB")
    try:
        # SafeLoader refuses Python object tags (!!python/object...): a recipe cannot run code.
        tree = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{what} is not valid YAML: {first}") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply to be a recipe") from None
    except TypeError as e:  # a complex key: `? [a, b]`
        raise UsageError(f"{what}: keys must be plain names ({e})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UsageError(f"{what} must be a mapping (key: value lines), got {type(tree).__name__}")
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UsageError(f"override {quote(item)} must look like section.key=value (e.g. optim.lr=1e-3)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2:
        raise UsageError(f"override key {quote(key)} must name a section and a key, e.g. optim.lr")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {quote(key)}: {quote(part)} is not a section")
    node[parts[-1]] = value


def from_dict(tree: dict) -> Recipe:
    sections = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise UsageError(f"unknown recipe section {quote(name)}{suggest(name, SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UsageError(f"recipe section {quote(name)} must be a mapping, got {quote(values)}")
        sections[name] = build_section(name, values)
    recipe = Recipe(**sections)
    # Each member in full (every key, defaults filled in): a member written with its defaults spelled
    # out is the same ensemble, and a resume must see it so.
    recipe.teacher.extra = [{k: getattr(member_section(i, m), k) for k in MEMBER_KEYS}
                            for i, m in enumerate(recipe.teacher.extra)]
    return recipe


def build_section(section: str, values: dict):
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UsageError(f"unknown key {section}.{shorten(str(key), 80)}{suggest(key, hints)}")
        kwargs[key] = coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type; accept the harmless conversions YAML needs."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None or value == "null":
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) > 1:  # e.g. data.class_map: a file or a list
            for kind in kinds:
                try:
                    return coerce(key, value, kind)
                except UsageError:
                    pass
            raise UsageError(f"{key} must be {' or '.join(k.__name__ for k in kinds)} or null, got {value!r}")
        hint = kinds[0]
    base = typing.get_origin(hint) or hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise UsageError(f"{key} must be a finite number, got {quote(value)}")
            return float(number)
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads true/yes/on as a bool: "true"/"false" for str choices
            return str(value).lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif base is list:
        if isinstance(value, (list, tuple)):
            check_finite(key, value)
            return list(value)
    elif base is dict:
        if isinstance(value, dict):
            check_finite(key, value)
            return value
    want = getattr(base, "__name__", str(base)) + (" or null" if optional else "")
    raise UsageError(f"{key} must be {want}, got {quote(value)}")


def check_finite(key: str, value: Any) -> None:
    """NaN and infinity anywhere in a list or mapping (e.g. model.kwargs) are refused too."""
    items = ((f"{key}.{k}", v) for k, v in value.items()) if isinstance(value, dict) else (
        (f"{key}[{i}]", v) for i, v in enumerate(value))
    for name, item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise UsageError(f"{name} must be a finite number, got {quote(item)}")
        if isinstance(item, (dict, list, tuple)):
            check_finite(name, item)


def member_section(index: int, member: Any) -> TeacherSection:
    """teacher.extra[index] as a TeacherSection, its keys and values checked like the teacher's own."""
    where = f"teacher.extra[{index}]"
    if not isinstance(member, dict):
        raise UsageError(f"{where} must be a mapping such as {{name: resnet50, weights: w.safetensors}}, "
                         f"got {quote(member)}")
    for key in member:
        if key not in MEMBER_KEYS:
            hint = " (YAML needs a space after each colon: {name: resnet50})" if ":" in str(key) else ""
            raise UsageError(f"unknown key {where}.{shorten(str(key), 80)}{suggest(key, MEMBER_KEYS)} (a member takes "
                             f"{', '.join(MEMBER_KEYS)}){hint}")
    if not member.get("name"):
        raise UsageError(f"{where} needs a name (a timm model name)")
    hints = typing.get_type_hints(TeacherSection)
    section = TeacherSection(**{k: coerce(f"{where}.{k}", v, hints[k]) for k, v in member.items()})
    for f in fields_of("teacher"):
        if f.name in MEMBER_KEYS:
            check_field(f"{where}.{f.name}", getattr(section, f.name), f.metadata)
    return section

