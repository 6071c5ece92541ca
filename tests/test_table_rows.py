"""usi/studies/table_rows.py: the table's rows from its runs; the cost columns at the data's class count."""
from types import SimpleNamespace

import pytest
import torch

from usi.studies import table_rows
from usi.studies.table_spec import Row


def base(root, class_map=None):
    return SimpleNamespace(data=SimpleNamespace(root=str(root), train_split="train", class_map=class_map,
                                                input_size=16),
                           model=SimpleNamespace(kwargs={}), teacher=SimpleNamespace(name=None, kwargs={}))


def test_the_class_count_comes_from_a_run_the_class_map_or_the_folder_never_timms_1000(image_root, tmp_path):
    done = {"m": [{"summary": {"num_classes": 7}}]}
    assert table_rows.class_count(base(image_root), done) == 7
    assert table_rows.class_count(base(image_root), {}) == 4  # the train folder's classes
    assert table_rows.class_count(base(image_root, class_map=["ring", "circle"]), {}) == 2
    assert table_rows.class_count(base(tmp_path / "nowhere"), {}) is None
    cost, note = table_rows.measured_cost(Row("r", "test_resnet"), base(image_root), None, torch.device("cpu"))
    assert cost == {} and "class count is unknown" in note
    cost, note = table_rows.measured_cost(Row("r", "test_resnet"), base(image_root), 4, torch.device("cpu"))
    assert not note and cost["input_size"] == 16
    assert cost["params_m"] == pytest.approx(sum(p.numel() for p in __import__("timm").create_model(
        "test_resnet", num_classes=4).parameters()) / 1e6)


def test_markdown_cells_show_a_mean_with_its_standard_error():
    (shown,) = table_rows.cells([{"top1_kd": 71.234, "top1_kd_se": 0.456, "gain": 1.0, "gain_se": None}])
    assert shown["top1_kd"] == "71.23 ± 0.46" and shown["gain"] == 1.0
