"""usi/studies/table.py: result rows, their cells, markdown / CSV / plot, params and GMACs."""
import csv

import pytest
import torch

from usi.studies import table


def test_a_row_takes_the_gain_from_both_runs_and_the_published_figure_by_name():
    row = table.row("resnet50", nokd={"top1": 70.0, "ece": 3.0}, kd={"top1": 72.5, "agreement": 90.0, "kl": 0.2,
                                                                      "train_img_s": 100.0}, cost=None)
    assert row["gain"] == 2.5 and row["usi_published"] == 81.0 and row["family"] == "CNN"
    assert row["agreement_kd"] == 90.0 and row["train_img_s"] == 100.0 and row["params_m"] is None
    alone = table.row("my_net", nokd={"top1": 50.0}, kd=None, cost=None, note="kd failed")
    assert alone["gain"] is None and alone["family"] == "?" and alone["note"] == "kd failed"
    assert list(alone) == table.COLUMNS


def test_cells_round_by_size_and_a_missing_value_is_a_dash():
    assert table.cell(None) == "-" and table.cell(81.04) == "81.04" and table.cell(0.01234) == "0.0123"
    assert table.cell(12345.6) == "12346" and table.cell(0.0) == "0.00" and table.cell("x") == "x"


def test_write_gives_markdown_of_the_filled_columns_and_csv_of_every_column(tmp_path):
    rows = [table.row("test_resnet", nokd={"top1": 40.0}, kd={"top1": 45.0}, cost={"params_m": 0.4})]
    drawn = []
    paths = table.write(rows, tmp_path / "out", "t", "A title", draw=lambda r, p, title: drawn.append((p, title)))
    md = paths["md"].read_text()
    assert md.startswith("A title\n\n| model | family | params_m | top1_nokd | top1_kd | gain |")
    assert "| test_resnet | CNN | 0.40 | 40.00 | 45.00 | 5.00 |" in md and "agreement" not in md
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == table.COLUMNS and next(reader)["top1_kd"] == "45.0"
    assert drawn == [(paths["png"], "A title")]


def test_model_cost_counts_params_and_macs():
    cost = table.model_cost("test_resnet", 4, 16, torch.device("cpu"), batch=2, runs=1)
    model_params = sum(p.numel() for p in __import__("timm").create_model("test_resnet", num_classes=4).parameters())
    assert cost["params_m"] == pytest.approx(model_params / 1e6)
    assert cost["gmacs"] > 0 and cost["infer_img_s"] > 0
    bigger = table.model_cost("test_resnet", 4, 32, torch.device("cpu"), batch=2, runs=1)
    assert bigger["params_m"] == cost["params_m"]
    assert 3 * cost["gmacs"] < bigger["gmacs"] <= 4 * cost["gmacs"]  # 4x the pixels: the convolutions' MACs x 4
