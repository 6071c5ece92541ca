"""usi/distill/soft_labels.py: the stored form of the teacher's logits, the tail, chunks and their checksums,
the facts' comparison."""
import math

import pytest
import torch

from usi.distill import soft_labels as store
from usi.distill.distance import kl_distance
from usi.errors import UsageError


def teacher_logits(rows=6, classes=20, seed=0):
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * 3


def stored(logits, k):
    s = store.top_k(logits, k)
    return store.full_logits(s["values"], s["indices"], s["lse"], logits.shape[1])


def test_all_classes_give_the_teachers_logits_bit_for_bit():
    logits = teacher_logits()
    assert torch.equal(stored(logits, logits.shape[1]), logits)


def test_top_k_probabilities_are_exact_and_the_tail_keeps_its_mass():
    logits, k = teacher_logits(), 5
    probs, rebuilt = logits.softmax(1), stored(logits, k).softmax(1)
    top = logits.topk(k, dim=1).indices
    assert torch.allclose(rebuilt.gather(1, top), probs.gather(1, top), atol=1e-6)
    tail = torch.ones_like(probs, dtype=torch.bool).scatter_(1, top, False)
    assert torch.allclose((rebuilt * tail).sum(1), (probs * tail).sum(1), atol=1e-6)
    # the tail is spread uniformly: every non-top class has the same probability in a row
    spread = rebuilt[tail].view(len(logits), -1)
    assert torch.allclose(spread, spread[:, :1].expand_as(spread), rtol=1e-5)


def test_the_kd_loss_with_a_truncated_teacher_is_close_and_never_nan():
    student, logits = teacher_logits(seed=1), teacher_logits(seed=2)
    exact = kl_distance(student, logits, reduction="batchmean")
    approx = kl_distance(student, stored(logits, 10), reduction="batchmean")
    assert abs(approx - exact) / exact < 0.1
    sure = torch.zeros(2, 20)
    sure[:, 3] = 200.0  # a teacher so sure that the tail's mass rounds to 0 in fp32
    assert torch.isfinite(kl_distance(student[:2], stored(sure, 1), reduction="batchmean"))


def test_indices_are_int16_up_to_32767_classes():
    assert store.index_dtype(1000) == torch.int16 and store.index_dtype(40000) == torch.int32


def test_a_damaged_chunk_is_refused_and_not_counted_done(tmp_path):
    digest = store.write_chunk(tmp_path, "c.safetensors", [store.top_k(teacher_logits(), 3)] * 2)
    assert store.chunk_done(tmp_path, "c.safetensors") == digest
    assert store.read_chunk(tmp_path, "c.safetensors", digest)["values"].shape == (12, 3)
    data = bytearray((tmp_path / "c.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    assert store.chunk_done(tmp_path, "c.safetensors") is None
    with pytest.raises(UsageError, match="does not match its checksum"):
        store.read_chunk(tmp_path, "c.safetensors", digest)


def test_the_first_differing_fact_is_named_and_normalization_may_differ_with_a_fixed_fill():
    a = {"data.batch_size": 32, "normalization.mean": [0.5, 0.5, 0.5], "run.seed": 1}
    assert "data.batch_size: the store has 32, this run 64" in store.first_difference(a, {**a, "data.batch_size": 64},
                                                                                     fill_fixed=False)
    other = {**a, "normalization.mean": [0.4, 0.4, 0.4]}
    assert store.first_difference(a, other, fill_fixed=False).startswith("normalization.mean")
    assert store.first_difference(a, other, fill_fixed=True) is None


def test_a_store_is_read_only_when_complete_and_of_the_runs_facts(tmp_path):
    facts = {"run.seed": 1, "data.batch_size": 2}
    manifest = {"format": store.FORMAT, "facts": facts, "classes": 4, "top_k": 4, "steps_per_chunk": 2,
                "complete": False}
    store.write_manifest(tmp_path, manifest)
    with pytest.raises(UsageError, match="incomplete"):
        store.open_store(tmp_path, facts, classes=4, fill_fixed=False)
    store.write_manifest(tmp_path, {**manifest, "complete": True, "chunks": {}})
    with pytest.raises(UsageError, match="run.seed: the store has 1, this run 2"):
        store.open_store(tmp_path, {**facts, "run.seed": 2}, classes=4, fill_fixed=False)
    assert store.open_store(tmp_path, facts, classes=4, fill_fixed=False)["top_k"] == 4


def test_chunks_cover_every_step_once():
    starts = store.chunk_starts(17, 5)
    assert starts == [0, 5, 10, 15] and math.ceil(17 / 5) == len(starts)


def sound_manifest(**changes):
    return {"format": store.FORMAT, "facts": {"run.seed": 1, "data.batch_size": 2}, "classes": 4, "top_k": 4,
            "steps_per_chunk": 2, "complete": True, "chunks": {}, **changes}


@pytest.mark.parametrize("change, words", [
    ({"classes": "4"}, "classes is \"4\""), ({"top_k": 0}, "top_k is 0"), ({"steps_per_chunk": None}, "steps_per_chunk"),
    ({"top_k": 1000}, "top_k 1000 exceeds its 4 classes"), ({"facts": [1, 2]}, "records no facts"),
    ({"facts": {"run.seed": 1}}, "no batch size"), ({"complete": "no"}, "complete is \"no\""),
    ({"chunks": []}, "chunks are not"), ({"chunks": {"../../x.safetensors": "0"}}, "chunks are not"),
])
def test_a_damaged_manifest_is_one_line_naming_what_is_wrong(tmp_path, change, words):
    store.write_manifest(tmp_path, sound_manifest(**change))
    with pytest.raises(UsageError, match="manifest.json is damaged") as e:
        store.open_store(tmp_path, {"run.seed": 1, "data.batch_size": 2}, classes=4, fill_fixed=False)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_missing_chunk_is_refused_before_training_and_an_unreadable_one_is_one_line(tmp_path):
    name = store.chunk_name(0, 0, 0)
    digest = store.write_chunk(tmp_path, name, [store.top_k(teacher_logits(rows=2, classes=4), 4)])
    facts = {"run.seed": 1, "data.batch_size": 2, "epochs": 1, "processes": 1, "steps_per_epoch": 4}
    both = {name: digest, store.chunk_name(0, 0, 2): digest}
    # a chunk missing from the list (or a hand-edited steps_per_chunk) does not add up to the facts
    for change in ({"chunks": {name: digest}}, {"chunks": both, "steps_per_chunk": 3}):
        store.write_manifest(tmp_path, sound_manifest(facts=facts, **change))
        with pytest.raises(UsageError, match=r"damaged \(it lists \d chunks where its facts and steps_per_chunk make"):
            store.open_store(tmp_path, facts, classes=4, fill_fixed=False)
    store.write_manifest(tmp_path, sound_manifest(facts=facts, chunks=both))
    with pytest.raises(UsageError, match=r"lacks 1 of its 2 chunks \(e0000-r000-s000002.safetensors first\); run the "
                                         r"same usi soft-labels again"):
        store.open_store(tmp_path, facts, classes=4, fill_fixed=False)
    (tmp_path / name).unlink()
    with pytest.raises(UsageError, match="cannot be read"):
        store.read_chunk(tmp_path, name, digest)


def test_a_chunk_of_another_k_than_its_manifest_says_is_one_line(tmp_path):
    name = store.chunk_name(0, 0, 0)
    digest = store.write_chunk(tmp_path, name, [store.top_k(teacher_logits(rows=2, classes=4), 4)])
    manifest = sound_manifest(top_k=2, steps_per_chunk=1, chunks={name: digest})  # top_k edited from 4 to 2
    labels = store.StoredLabels(tmp_path, manifest, rank=0, teacher=None)
    with pytest.raises(UsageError, match="does not hold top-2 rows as its manifest.json says"):
        labels.logits_at(0, 0)
