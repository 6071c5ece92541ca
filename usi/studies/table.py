"""Result tables: one row per backbone, from its runs' summaries and evaluations.

Shared by `usi quickstart`, `usi table` and `usi fidelity` (its own columns and plot, the same write
path). Writes markdown, CSV and a PNG plot of top-1 against inference throughput (the paper's
speed-accuracy figure), drawn with Pillow so that plotting adds no dependency.
"""
from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from usi.errors import printable

# Published USI top-1 (ImageNet-1k) by timm model name, from the paper's table.
PUBLISHED = {
    "resnet50": 81.0, "tresnet_m": 82.4, "convnext_small": 84.0, "regnety_032": 82.8, "efficientnet_b0": 79.3,
    "mobilenetv3_large_100": 77.3, "vit_small_patch16_224": 81.8, "levit_384": 82.7,
    "swin_small_patch4_window7_224": 84.0, "tnt_s_patch16_224": 82.5, "mixer_b16_224": 82.0,
    "resmlp_12_224": 78.8,
}
FAMILY = {
    "resnet50": "CNN", "tresnet_m": "CNN", "convnext_small": "CNN", "regnety_032": "CNN", "test_resnet": "CNN",
    "efficientnet_b0": "mobile", "mobilenetv3_large_100": "mobile", "test_efficientnet": "mobile",
    "vit_small_patch16_224": "transformer", "levit_384": "transformer", "swin_small_patch4_window7_224":
    "transformer", "tnt_s_patch16_224": "transformer", "test_vit": "transformer", "mixer_b16_224": "MLP",
    "resmlp_12_224": "MLP",
}
COLUMNS = ["model", "family", "params_m", "gmacs", "top1_nokd", "top1_kd", "gain", "usi_published",
           "agreement_nokd", "agreement_kd", "kl_kd", "ece_nokd", "ece_kd", "train_img_s", "infer_img_s", "note"]


def model_cost(name: str, num_classes: int, input_size: int, device: torch.device, batch: int = 64,
               runs: int = 5, **kwargs) -> dict:
    """Params, GMACs of one forward at input_size, and eval-mode images/s (median of `runs`)."""
    model = timm.create_model(name, num_classes=num_classes, **kwargs).eval().to(device)
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    times = []
    with torch.no_grad():
        for i in range(runs + 1):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gmacs": counter.get_total_flops() / 2 / 1e9, "infer_img_s": batch / statistics.median(times)}


def row(model: str, *, nokd: dict | None, kd: dict | None, cost: dict | None, note: str = "",
        family: str | None = None) -> dict:
    """nokd / kd: evaluation metrics of the best weights ({top1, ece, agreement, kl}); train_img_s
    comes from the KD run's summary when given as kd['train_img_s']."""
    nokd, kd, cost = nokd or {}, kd or {}, cost or {}
    out = {"model": model, "family": family or FAMILY.get(model, "?"), "params_m": cost.get("params_m"),
           "gmacs": cost.get("gmacs"), "top1_nokd": nokd.get("top1"), "top1_kd": kd.get("top1"),
           "gain": None, "usi_published": PUBLISHED.get(model), "agreement_nokd": nokd.get("agreement"),
           "agreement_kd": kd.get("agreement"), "kl_kd": kd.get("kl"), "ece_nokd": nokd.get("ece"),
           "ece_kd": kd.get("ece"), "train_img_s": kd.get("train_img_s", nokd.get("train_img_s")),
           "infer_img_s": cost.get("infer_img_s"), "note": note}
    if out["top1_kd"] is not None and out["top1_nokd"] is not None:
        out["gain"] = out["top1_kd"] - out["top1_nokd"]
    return out


def cell(value, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.3g}" if 0 < abs(value) < 0.1 else f"{value:.2f}"
    return str(value)


def markdown(columns: list[str], rows: list[dict], cell: Callable[[object, str], str] = cell) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(rows: list[dict], out_dir: Path, stem: str, title: str, *, columns: list[str] = COLUMNS,
          cell: Callable[[object, str], str] = cell, draw: Callable | None = None) -> dict[str, Path]:
    """<out_dir>/<stem>.md (the columns any row fills), .csv (every column) and .png (draw(rows, path,
    title); this module's speed-accuracy plot unless a study draws its own): every study writes here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv", "png": out_dir / f"{stem}.png"}
    paths["md"].write_text(f"{title}\n\n{markdown(filled(columns, rows), rows, cell)}\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (draw or plot)(rows, paths["png"], title)
    return paths


def filled(columns: list[str], rows: list[dict]) -> list[str]:
    """The columns some row has a value in."""
    return [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]


def show(title: str, text: str, paths: dict[str, Path]) -> None:
    """A study's closing words on the console: its title, its table, the files written."""
    lines = [title, "", *text.split("\n"), "", f"written: {', '.join(str(p) for p in paths.values())}"]
    print("\n" + "\n".join(printable(line) for line in lines))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Top-1 (with and without KD) against inference images/s, log x axis."""
    from PIL import Image, ImageDraw

    pts = [(r["infer_img_s"], r[k], r["model"], k) for r in rows for k in ("top1_nokd", "top1_kd")
           if r.get("infer_img_s") and r.get(k) is not None]
    w, h, m = 720, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((m, 15), title.splitlines()[0][:100], fill="black")  # the headline; the md file has the rest
    d.rectangle([m, m, w - m, h - m], outline="black")
    if pts:
        xs = [math.log10(p[0]) for p in pts]
        ys = [p[1] for p in pts]
        x0, x1 = min(xs) - 0.1, max(xs) + 0.1
        y0, y1 = min(ys) - 2, max(ys) + 2
        sx = lambda v: m + (math.log10(v) - x0) / (x1 - x0) * (w - 2 * m)  # noqa: E731
        sy = lambda v: h - m - (v - y0) / (y1 - y0) * (h - 2 * m)  # noqa: E731
        for r in rows:  # an arrow from without KD to with KD
            if r.get("infer_img_s") and r.get("top1_nokd") is not None and r.get("top1_kd") is not None:
                d.line([sx(r["infer_img_s"]), sy(r["top1_nokd"]), sx(r["infer_img_s"]), sy(r["top1_kd"])],
                       fill="gray", width=1)
        for speed, top1, name, kind in pts:
            x, y = sx(speed), sy(top1)
            color = "red" if kind == "top1_kd" else "blue"
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
            if kind == "top1_kd":
                d.text((x + 6, y - 6), name, fill="black")
        for v in (y0, (y0 + y1) / 2, y1):
            d.text((5, sy(v) - 5), f"{v:.1f}", fill="black")
        for v in (x0, (x0 + x1) / 2, x1):
            d.text((sx(10 ** v) - 15, h - m + 8), f"{10 ** v:.0f}", fill="black")
    d.text((w // 2 - 80, h - 22), "inference images/s (log)", fill="black")
    d.text((5, m - 20), "top-1 %", fill="black")
    d.text((w - m - 150, m + 5), "red: KD   blue: no KD", fill="black")
    img.save(path)
