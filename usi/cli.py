"""The `usi` command: train, eval, quickstart."""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from usi import __version__
from usi.errors import UsageError, one_line, printable


def cmd_train(args) -> int:
    from usi import recipe as recipe_mod
    from usi.training.build import dry_run
    from usi.training.loop import train

    recipe = recipe_mod.load(recipe_mod.recipe_path(args.recipe), args.overrides)
    if args.dry_run:
        print(dry_run(recipe))
        return 0
    train(recipe)
    return 0


def cmd_export(args) -> int:
    from usi.evaluation.export import export

    report = export(Path(args.checkpoint), Path(args.out), weights=args.weights, onnx=args.onnx)
    print(printable(f"{report['model']} ({report['weights']} weights) -> {report['out']}: timm loads it as "
                    f"timm.create_model('local-dir:{report['out']}', pretrained=True) (max |logit difference| "
                    f"{report['timm_max_abs_diff']:.2g})"
                    + (f"; model.onnx (max |logit difference| {report['onnx_max_abs_diff']:.2g})" if args.onnx
                       else "")))
    return 0


def cmd_keys(args) -> int:
    from usi import recipe as recipe_mod

    print(recipe_mod.describe(args.section))
    return 0


def cmd_eval(args) -> int:
    from usi.evaluation.report import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(Path(args.checkpoint), args.overrides)
    if report is not None:
        print(format_report(report, args.json))
    return 0


def cmd_quickstart(args) -> int:
    from usi.studies.quickstart import quickstart

    quickstart(Path(args.out), seed=args.seed, rerun=args.rerun)
    return 0


def cmd_soft_labels(args) -> int:
    from usi import recipe as recipe_mod
    from usi.training.soft_label_pass import write_store

    recipe = recipe_mod.load(recipe_mod.recipe_path(args.recipe), args.overrides)
    manifest = write_store(recipe, Path(args.out), top_k=args.top_k, steps_per_chunk=args.steps_per_chunk)
    if manifest.get("complete"):
        print(f"{args.out}: top-{manifest['top_k']} soft labels of {len(manifest['chunks'])} chunks, "
              f"{manifest['bytes'] / 2**20:.1f} MiB; train with teacher.soft_labels={args.out}")
    return 0


def cmd_tool(name: str, argv: list[str]) -> int:
    """`usi shards ...`, `usi table ...`, `usi fidelity ...`: tools with arguments of their own (see --help)."""
    if name == "shards":
        from usi.data.shard_writer import main as tool
    elif name == "fidelity":
        from usi.studies.fidelity import main as tool
    else:
        from usi.studies.tables import main as tool
    return tool(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usi", description="Distill any timm backbone with the USI recipe.")
    p.add_argument("--version", action="version", version=f"usi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a student (run under torchrun for several GPUs)",
                       epilog="every recipe key, its default and meaning: usi keys")
    t.add_argument("recipe", help="a recipe YAML file, or a built-in name: usi, quickstart")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.name=resnet50 optim.lr=1e-3")
    t.add_argument("--dry-run", action="store_true",
                   help="check the recipe, data and teacher, print the plan; write nothing, train nothing")
    t.set_defaults(run=cmd_train)
    x = sub.add_parser("export", help="the student as a folder timm loads without usi (and as ONNX)")
    x.add_argument("checkpoint", help="a run's best.safetensors or last.pt")
    x.add_argument("out", help="a new folder: model.safetensors + config.json (+ model.onnx)")
    x.add_argument("--weights", choices=["raw", "ema"], help="from last.pt: which weights (default: ema)")
    x.add_argument("--onnx", action="store_true", help="also write model.onnx (needs pip install 'usi[onnx]')")
    x.set_defaults(run=cmd_export)
    k = sub.add_parser("keys", help="every recipe key with its default, choices and meaning")
    k.add_argument("section", nargs="?", help="one section only, e.g. optim")
    k.set_defaults(run=cmd_keys)
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
    s = sub.add_parser("soft-labels", help="store the teacher's outputs on every training batch, for "
                                           "teacher.soft_labels (run under torchrun as the students will)")
    s.add_argument("recipe", help="the training recipe (a YAML file or a built-in name)")
    s.add_argument("overrides", nargs="*", help="section.key=value, as for usi train")
    s.add_argument("--out", required=True, help="the store's folder (resumed where a killed writer stopped)")
    s.add_argument("--top-k", type=int, help="logits kept per sample; default: all classes (exact)")
    s.add_argument("--steps-per-chunk", type=int, default=50, help="training steps per file")
    s.set_defaults(run=cmd_soft_labels)
    # parsed by the tools themselves (main() hands them their arguments); listed here for --help
    sub.add_parser("shards", help="write image folders as webdataset shards (usi shards --help)")
    sub.add_parser("table", help="one recipe, many backbones: the benchmark table (usi table --help)")
    sub.add_parser("fidelity", help="the fidelity study: self-distillation, augmentation, ensembles "
                                    "(usi fidelity --help)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """Overrides may come before or after the flags (`usi train usi --dry-run model.name=resnet50`)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("shards", "table", "fidelity"):
        run = partial(cmd_tool, argv[0], argv[1:])
    else:
        args = parse(argv)
        run = partial(args.run, args)
    from usi.runtime.preempt import Interrupted
    from usi.training.meter import NonFiniteError

    try:
        return run()
    except UsageError as e:
        return report(f"usi: error: {one_line(e)}", 2)
    except NonFiniteError as e:
        return report(f"usi: stopped: {one_line(e)}", 1)
    except Interrupted as e:  # SIGTERM / SIGINT during training: the checkpoint is written
        return report(f"usi: {e}", e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing to save yet
        return report("usi: interrupted", 130)
    except Exception as e:  # noqa: BLE001 - what no check foresaw: still one line, the traceback kept
        if os.environ.get("USI_TRACEBACK"):
            raise
        return report(f"usi: error: {unexpected(e)}", 1)


def unexpected(error: Exception) -> str:
    """An error no check of usi's foresaw (a library's, or a bug), in one line: its type, message and
    where it was raised. The whole traceback goes to the run's log.txt when one is open, or is shown
    with USI_TRACEBACK=1."""
    import traceback

    from usi.runtime.progress import to_log_file

    frame = traceback.extract_tb(error.__traceback__)[-1]
    to_log_file("".join(traceback.format_exception(error)).rstrip())
    where = f"{Path(frame.filename).name}:{frame.lineno}"
    return (f"{type(error).__name__}: {one_line(error)} (in {where}; USI_TRACEBACK=1 shows the whole traceback)")


def report(line: str, code: int) -> int:
    """The one line a failed or stopped command ends with: on rank 0's console, and in log.txt if a run
    directory is open."""
    from usi.runtime.distributed import env_rank
    from usi.runtime.progress import to_log_file

    if env_rank() == 0:
        print(line, file=sys.stderr)
        to_log_file(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
