"""usi/studies/table.py: result rows, their cells, markdown / CSV / JSON / plot, params and GMACs, families."""
import csv
import json

import pytest
import torch

from usi.studies import table


def test_a_row_takes_the_gain_from_both_runs_and_the_published_figure_by_name():
    row = table.row("resnet50", nokd={"top1": 70.0, "ece": 3.0}, kd={"top1": 72.5, "agreement": 90.0, "kl": 0.2,
                                                                      "train_img_s": 100.0}, cost=None)
    assert row["gain"] == 2.5 and row["usi_published"] == 81.0 and row["family"] == "resnet"
    assert row["kind"] == "CNN"
    assert row["agreement_kd"] == 90.0 and row["train_img_s"] == 100.0 and row["params_m"] is None
    alone = table.row("my_net", nokd={"top1": 50.0}, kd=None, cost=None, note="kd failed")
    assert alone["gain"] is None and alone["family"] == "?" and alone["kind"] == "?" and alone["note"] == "kd failed"
    assert list(alone) == table.COLUMNS


def test_cells_round_by_size_and_a_missing_value_is_a_dash():
    assert table.cell(None) == "-" and table.cell(81.04) == "81.04" and table.cell(0.01234) == "0.0123"
    assert table.cell(12345.6) == "12346" and table.cell(0.0) == "0.00" and table.cell("x") == "x"


def test_write_gives_markdown_of_the_filled_columns_and_csv_of_every_column(tmp_path):
    rows = [table.row("test_resnet", nokd={"top1": 40.0}, kd={"top1": 45.0}, cost={"params_m": 0.4})]
    drawn = []

    def draw(rows, path, title):
        drawn.append((path.name, title))
        path.write_bytes(b"png")

    paths = table.write(rows, tmp_path / "out", "t", "A title", draw=draw, meta={"seeds": [0]})
    md = paths["md"].read_text()
    assert md.startswith("A title\n\n| model | kind | family | params_m | top1_nokd | top1_kd | gain |")
    assert "| test_resnet | CNN | resnet | 0.40 | 40.00 | 45.00 | 5.00 |" in md and "agreement" not in md
    saved = json.loads(paths["json"].read_text())
    assert saved["title"] == "A title" and saved["seeds"] == [0] and saved["rows"][0]["top1_kd"] == 45.0
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == table.COLUMNS and next(reader)["top1_kd"] == "45.0"
    assert drawn == [("t.png", "A title")] and paths["png"].read_bytes() == b"png"


def test_model_cost_counts_params_and_macs():
    cost = table.model_cost("test_resnet", 4, 16, torch.device("cpu"), batch=2, runs=1)
    model_params = sum(p.numel() for p in __import__("timm").create_model("test_resnet", num_classes=4).parameters())
    assert cost["params_m"] == pytest.approx(model_params / 1e6)
    assert cost["gmacs"] > 0 and cost["infer_img_s"] > 0
    bigger = table.model_cost("test_resnet", 4, 32, torch.device("cpu"), batch=2, runs=1)
    assert bigger["params_m"] == cost["params_m"]
    assert 3 * cost["gmacs"] < bigger["gmacs"] <= 4 * cost["gmacs"]  # 4x the pixels: the convolutions' MACs x 4


@pytest.mark.parametrize("name, family, kind", [
    ("resnet50", "resnet", "CNN"), ("test_efficientnet", "efficientnet", "mobile"),
    ("mobilenetv3_large_100", "mobilenetv3", "mobile"), ("vit_small_patch16_224", "vision_transformer", "ViT"),
    ("deit_tiny_distilled_patch16_224", "deit", "ViT"), ("levit_128", "levit", "hybrid"),
    ("mixer_b16_224", "mlp_mixer", "MLP"), ("resmlp_12_224", "mlp_mixer", "MLP"), ("no_such_net", "?", "?")])
def test_family_is_timms_module_of_the_model_and_kind_its_sort(name, family, kind):
    assert table.family_of(name) == family and table.kind_of(family) == kind


def test_model_cost_counts_the_head_of_the_datas_classes_at_the_runs_input_size():
    """A 10-class head, not timm's 1000-class default; an MLP at 32 px with 4-px patches, as a run builds it."""
    ten = table.model_cost("mixer_s16_224", 10, 32, torch.device("cpu"), batch=2, runs=1, patch_size=4)
    thousand = table.model_cost("mixer_s16_224", 1000, 32, torch.device("cpu"), batch=2, runs=1, patch_size=4)
    assert (thousand["params_m"] - ten["params_m"]) * 1e6 == pytest.approx(990 * 513)  # head: 512 weights + bias
    coarse = table.model_cost("mixer_s16_224", 10, 32, torch.device("cpu"), batch=2, runs=1)  # 16-px patches
    assert ten["gmacs"] > 10 * coarse["gmacs"]  # 64 tokens against 4
    assert ten["infer_precision"] == "fp32 cpu batch 2"


def test_the_plot_is_a_picture_with_every_model_labelled(tmp_path):
    rows = [{"model": "a_net", "infer_img_s": 100.0, "top1_nokd": 60.0, "top1_kd": 63.0, "top1_kd_se": 0.5},
            {"model": "b_net", "infer_img_s": 1000.0, "top1_nokd": 50.0, "top1_kd": None}]
    table.plot(rows, tmp_path / "p.png", "title")
    import numpy as np
    from PIL import Image
    with Image.open(tmp_path / "p.png") as img:
        assert img.size[0] >= 800 and len(np.unique(np.asarray(img.convert("L")))) > 10  # drawn on, not blank


def test_written_files_replace_a_link_planted_at_their_name_and_never_write_through_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("t.md", "t.csv", "t.json", "t.png"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("mine")
        (out / name).symlink_to(victims[name])
    table.write([table.row("test_resnet", nokd={"top1": 1.0}, kd=None, cost=None)], out, "t", "title")
    assert all(v.read_text() == "mine" for v in victims.values())
    assert all((out / name).is_file() and not (out / name).is_symlink() for name in victims)
