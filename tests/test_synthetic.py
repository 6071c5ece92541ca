"""usi/data/synthetic.py: the quickstart's generated shapes dataset and its digest."""
from usi.data.folder import FolderSplit
from usi.data.synthetic import CLASSES, digest, make_dataset


def test_make_dataset_writes_the_splits_it_is_asked_for(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=3, val_per_class=2, size=12, num_classes=3)
    train, val = FolderSplit(root / "train"), FolderSplit(root / "val", classes=list(CLASSES[:3]))
    assert train.classes == sorted(CLASSES[:3]) and len(train) == 9 and len(val) == 6
    img, _ = train.dataset(None)[0]
    assert img.size == (12, 12) and img.mode == "RGB"


def test_the_same_seed_gives_the_same_files_and_another_seed_other_ones(tmp_path):
    a = make_dataset(tmp_path / "a", train_per_class=2, val_per_class=1, size=12, num_classes=2, seed=1)
    b = make_dataset(tmp_path / "b", train_per_class=2, val_per_class=1, size=12, num_classes=2, seed=1)
    c = make_dataset(tmp_path / "c", train_per_class=2, val_per_class=1, size=12, num_classes=2, seed=2)
    assert digest(a) == digest(b) != digest(c)
    assert len(digest(a)) == 16


def test_a_finished_dataset_is_reused_and_a_changed_file_changes_the_digest(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=2, val_per_class=1, size=12, num_classes=2)
    before = digest(root)
    first = sorted((root / "train").rglob("*.jpg"))[0]
    stamp = first.stat().st_mtime_ns
    assert make_dataset(root, train_per_class=2, val_per_class=1, size=12, num_classes=2) == root
    assert first.stat().st_mtime_ns == stamp  # reused, not rewritten
    first.write_bytes(first.read_bytes() + b"\0")
    assert digest(root) != before
