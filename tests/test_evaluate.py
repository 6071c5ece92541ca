"""usi/evaluation/evaluate.py: one exact pass, every model on the same batch: fp32 logits, ensemble members."""
import json

import pytest
import torch

from usi.models import Compute

from conftest import read_jsonl, usi_main
from helpers import Spy, ensemble_args, teacher_files, train


def test_an_ensemble_run_reports_fidelity_to_the_ensemble_and_each_member(image_root, tmp_path):
    paths = teacher_files(tmp_path)
    out = train(image_root, tmp_path / "run", *ensemble_args(paths))
    assert out.returncode == 0, out.stderr
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["train"]["kd_loss"] > 0
    for variant in ("raw", "ema"):
        members = record[variant]["members"]
        assert len(members) == 3 and all(0 <= m["agreement"] <= 100 and m["kl"] >= 0 for m in members)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    teacher = summary["teacher_metrics"]
    assert teacher["count"] == 12 and len(teacher["members"]) == 3
    assert summary["teacher"] == "test_resnet + test_efficientnet + test_resnet"
    assert [m["name"] for m in teacher["members"]] == ["test_resnet", "test_efficientnet", "test_resnet"]
    # the members are different networks: their KLs to the student differ, and so do their own NLLs
    assert len({round(m["kl"], 6) for m in record["raw"]["members"]}) == 3
    assert len({round(m["nll"], 6) for m in teacher["members"]}) == 3

    # usi eval: the stored recipe's member files are never opened; the command line names the ensemble
    alone = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}", "--json")
    assert alone.returncode == 0 and "teacher not evaluated" in alone.stderr
    assert "teacher" not in json.loads(alone.stdout)
    again = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                     *ensemble_args(paths)[1:], "--json")
    assert again.returncode == 0, again.stderr
    # the other members alone would leave the first teacher to timm's hub: refused in one line
    partial = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                       *ensemble_args(paths)[2:])
    assert partial.returncode == 2 and "pass teacher.weights=... for the first teacher too" in partial.stderr
    report = json.loads(again.stdout)
    assert report["teacher_cached"]  # the training run cached the ensemble's val logits
    assert report["teacher"]["name"] == "test_resnet + test_efficientnet + test_resnet"
    assert [m["name"] for m in report["teacher"]["members"]] == ["test_resnet", "test_efficientnet", "test_resnet"]
    best = summary["best"]["weights"]
    recorded = next(r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                    if r["epoch"] == summary["best"]["epoch"])[best]["members"]
    evaluated = report["students"][best]["members"]
    assert len(evaluated) == len(recorded) == 3
    for got, expected in zip(evaluated, recorded):  # pytest.approx takes no list of dicts (pytest >= 9.1)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected)
    text = usi_main("eval", str(tmp_path / "run" / "best.safetensors"), f"data.root={image_root}",
                    *ensemble_args(paths)[1:])
    assert "2: test_efficientnet" in text.stdout and "against" in text.stdout


class Batches(list):
    """A loader: its batches, and a sampler that says how many samples this rank's pass holds."""

    @property
    def sampler(self):
        return range(sum(len(x) for x, _ in self))


class Fixed(torch.nn.Module):
    """A 'model' whose logits are the flattened input: the test chooses every row."""

    def forward(self, x):
        return x.flatten(1)


def test_every_model_sees_the_same_batch_and_each_sample_counts_once():
    from usi.evaluation.evaluate import evaluate
    from usi.models import Compute

    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]]).view(4, 3, 1, 1)
    labels = torch.tensor([0, 1, 1, 0])
    batches = Batches([(x[:3], torch.stack([labels[:3], torch.arange(3)], 1)),
                       (x[3:], torch.stack([labels[3:], torch.tensor([3])], 1)),
                       (x[:0], torch.zeros(0, 2, dtype=torch.long))])  # a batch whose every image was unreadable
    teacher = torch.nn.Sequential(Fixed(), torch.nn.Flatten())
    results, kept = evaluate({"a": Fixed(), "b": Fixed()}, batches, Compute(torch.device("cpu")), teacher=teacher,
                             keep_teacher_logits=True)
    assert set(results) == {"a", "b", "teacher"}
    assert results["a"] == results["b"]  # the same weights on the same batches: the same sums
    assert results["a"]["count"] == 4 and results["a"]["top1"] == 75.0  # row 2 predicts class 2, label 1
    assert results["a"]["agreement"] == 100.0 and results["a"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert results["teacher"]["count"] == 4 and "agreement" not in results["teacher"]
    assert kept.shape == (4, 3) and torch.equal(kept, x.flatten(1))  # the teacher's logits by position


def test_teacher_logits_given_by_position_replace_the_teacher_and_missing_rows_stay_nan():
    from usi.evaluation.evaluate import by_position, evaluate
    from usi.models import Compute

    x = torch.eye(3).view(3, 3, 1, 1) * 4
    batches = [(x, torch.stack([torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])], 1))]
    reversed_teacher = torch.stack([x.flatten(1)[1], x.flatten(1)[2], x.flatten(1)[0]])  # row p for position p
    results, kept = evaluate({"s": Fixed()}, batches, Compute(torch.device("cpu")), teacher_logits=reversed_teacher)
    assert kept is None and "teacher" not in results
    # position 2 is sample 0 (class 0): the teacher row at 2 is class 0 too; every sample agrees
    assert results["s"]["agreement"] == 100.0
    rows = by_position([(torch.tensor([0, 3]), torch.ones(2, 2))], size=5)
    assert rows.shape == (5, 2) and torch.isnan(rows[[1, 2, 4]]).all() and torch.equal(rows[[0, 3]], torch.ones(2, 2))


class Split(torch.nn.Module):
    """A timm-like model: body and head apart; logits near 100, where bf16 steps are 0.5 apart."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 8, 1)
        self.head = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([100.0, 100.1, 100.2, 100.3, 100.4]))

    def forward_features(self, x):
        return self.body(x).mean((2, 3))

    def forward_head(self, f):
        return self.head(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_evaluation_logits_come_from_an_fp32_head_under_bf16():
    from usi.evaluation.evaluate import fp32_logits

    model, x = Split().eval(), torch.randn(4, 3, 6, 6)
    bf16 = Compute(torch.device("cpu"), amp_dtype=torch.bfloat16)
    with torch.no_grad():
        logits = fp32_logits(model, x, bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            all_bf16 = model(x).float()
            features = model.forward_features(x)
        expected = model.forward_head(features.float())
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)
    assert len(set(all_bf16[0].tolist())) < 5  # what a bf16 head does: ties among the 5 classes
    assert len(set(logits[0].tolist())) == 5


def test_an_evaluation_whose_loader_dies_raises_loader_broken():
    """A SIGTERM to the process group kills the val loader's workers: the evaluation says so in a type of
    its own (the trainer then checkpoints the trained epoch and stops), after every rank has agreed."""
    from usi.evaluation.evaluate import LoaderBroken, evaluate

    def val_batches():
        yield torch.randn(4, 3, 6, 6), torch.stack([torch.arange(4) % 4, torch.arange(4)], 1)
        raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")

    with pytest.raises(LoaderBroken, match="exited unexpectedly"):
        evaluate({"raw": Spy()}, val_batches(), Compute(torch.device("cpu")))
    whole = [(torch.randn(4, 3, 6, 6), torch.stack([torch.arange(4) % 4, torch.arange(4)], 1))]
    metrics, _ = evaluate({"raw": Spy()}, whole, Compute(torch.device("cpu")))
    assert metrics["raw"]["count"] == 4

