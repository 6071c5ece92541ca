"""The `usi` command: train, eval, quickstart."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from usi.errors import UsageError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str) -> Path:
    """A recipe file, or the name of a built-in one (`usi`, `quickstart`)."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    builtin = RECIPES / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    raise UsageError(f"recipe {name!r} is neither a file nor a built-in recipe "
                     f"({', '.join(sorted(p.stem for p in RECIPES.glob('*.yaml')))})")


def cmd_train(args) -> int:
    from usi import recipe as recipe_mod
    from usi.train import train

    recipe = recipe_mod.load(recipe_path(args.recipe), args.overrides)
    train(recipe)
    return 0


def cmd_eval(args) -> int:
    from usi.evaluation import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(Path(args.checkpoint), args.overrides)
    if report is not None:
        print(format_report(report, args.json))
    return 0


def cmd_quickstart(args) -> int:
    from usi.quickstart import quickstart

    quickstart(Path(args.out), seed=args.seed, rerun=args.rerun)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usi", description="Distill any timm backbone with the USI recipe.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a student (run under torchrun for several GPUs)")
    t.add_argument("recipe", help="a recipe YAML file, or a built-in name: usi, quickstart")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.name=resnet50 optim.lr=1e-3")
    t.set_defaults(run=cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, calibration, fidelity to the teacher")
    e.add_argument("checkpoint", help="a run's best.safetensors or last.pt")
    e.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.root=... data.input_size=288")
    e.add_argument("--json", action="store_true", help="print JSON instead of the report")
    e.set_defaults(run=cmd_eval)
    q = sub.add_parser("quickstart", help="the whole pipeline on a generated dataset, CPU, minutes")
    q.add_argument("--out", default="runs/quickstart", help="where data, runs and the table go")
    q.add_argument("--seed", type=int, default=42)
    q.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    q.set_defaults(run=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from usi.distributed import env_rank
    from usi.engine import NonFiniteError

    try:
        return args.run(args)
    except UsageError as e:
        if env_rank() == 0:
            print(f"usi: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"usi: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
