"""usi/recipe/schema.py: the sections and fields, their declared facts, the metrics table, run.dir templates, `usi keys`."""
from pathlib import Path

import pytest

from usi import recipe as R
from usi.errors import UsageError

from conftest import usi_main

REPO = Path(__file__).resolve().parent.parent


def test_each_field_declares_its_facts_once_next_to_it():
    import dataclasses
    for section, cls in R.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f"{section}.{f.name} has no help text"
    free = R.resume_free_keys()
    # where the data lives and how often to log may change on resume; what is trained may not
    assert {("data", "root"), ("data", "workers"), ("run", "resume"), ("run", "log_interval")} <= free
    assert not free & {("optim", "lr"), ("model", "name"), ("data", "batch_size"), ("run", "seed")}


def test_best_metric_choices_are_the_metrics_table():
    from usi.evaluation.metrics import METRICS
    for name in METRICS:
        assert R.load(None, [f"run.best_metric={name}"]).run.best_metric == name
    with pytest.raises(UsageError, match="run.best_metric='acc' is not one of top1, top5, nll, ece, agreement, kl"):
        R.load(None, ["run.best_metric=acc"])


def test_run_dir_template_fills_in_the_model_name():
    assert R.load(None, ["model.name=resnet18"]).run_dir() == Path("runs/resnet18")


def test_usi_keys_lists_every_key_with_its_default_and_meaning():
    out = usi_main("keys")
    lines = [x for x in out.stdout.splitlines() if x.startswith("  ")]
    assert len(lines) == sum(len(R.fields_of(s)) for s in R.SECTIONS)
    assert "  run.max_steps = 0 (>= 0): " in out.stdout and "  data.eval_batch_size = None" in out.stdout
    for key in ("model.grad_checkpointing = False", "optim.betas = None", "optim.momentum = None (>= 0.0 and < 1.0)",
                "optim.kwargs = {}", "run.sync_bn = False", "data.class_map = None"):
        assert f"  {key}" in out.stdout, key
    assert usi_main("keys", "optimm").returncode == 2
