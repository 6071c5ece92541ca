"""Result tables: one row per backbone, from its runs' summaries and evaluations.

Shared by `usi quickstart`, `usi table` and `usi fidelity` (its own columns and plot, the same write
path). Writes markdown, CSV and a PNG plot of top-1 against inference throughput (the paper's
speed-accuracy figure), drawn with matplotlib.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from usi.errors import printable
from usi.models import forward_macs, timm_model
from usi.runtime.files import atomic_write, json_safe

# Published USI top-1 (ImageNet-1k) by timm model name, from the paper's table.
PUBLISHED = {
    "resnet50": 81.0, "tresnet_m": 82.4, "convnext_small": 84.0, "regnety_032": 82.8, "efficientnet_b0": 79.3,
    "mobilenetv3_large_100": 77.3, "vit_small_patch16_224": 81.8, "levit_384": 82.7,
    "swin_small_patch4_window7_224": 84.0, "tnt_s_patch16_224": 82.5, "mixer_b16_224": 82.0,
    "resmlp_12_224": 78.8,
}
# A model's kind, from timm's own module of it (timm.models.<module>): the family is the module's name.
KINDS = {
    "CNN": {"resnet", "resnetv2", "resnest", "res2net", "regnet", "convnext", "tresnet", "densenet", "vgg", "dla",
            "dpn", "cspnet", "byobnet", "senet", "sknet", "xception", "xception_aligned", "inception_v3",
            "inception_v4", "inception_resnet_v2", "nfnet", "hrnet", "selecsls", "vovnet", "nasnet", "pnasnet",
            "rdnet", "hgnet", "inception_next", "mambaout", "starnet", "fasternet", "shvit"},
    "mobile": {"efficientnet", "mobilenetv3", "mobilenetv4", "mobilenetv5", "ghostnet", "rexnet", "hardcorenas",
               "repghost", "repvit", "mobileone", "lcnet", "tinynet", "mnasnet", "fbnet"},
    "ViT": {"vision_transformer", "deit", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
            "beit", "eva", "cait", "tnt", "xcit", "pit", "crossvit", "twins", "vision_transformer_relpos",
            "vision_transformer_sam", "hiera", "vitamin", "naflexvit", "pvt_v2", "davit", "gcvit", "focalnet",
            "nest", "sequencer", "volo", "mvitv2", "hieradet_sam2", "aimv2", "vision_transformer_flex"},
    "hybrid": {"levit", "mobilevit", "efficientformer", "efficientformer_v2", "fastvit", "coat", "maxxvit",
               "vision_transformer_hybrid", "convit", "edgenext", "nextvit", "tiny_vit", "efficientvit_mit",
               "efficientvit_msra", "poolformer", "metaformer", "ghostnetv3", "convmixer"},
    "MLP": {"mlp_mixer"},
}


def family_of(name: str) -> str:
    """timm's module of the model (resnet, vision_transformer, mlp_mixer, ...), '?' for an unknown name."""
    try:
        return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    except Exception:  # not a timm name: the row's note says so
        return "?"


def default_size(name: str) -> int:
    """The input size timm's pretrained config gives the model (224 when it gives none)."""
    cfg = timm.models.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg else None
    return int(size[-1]) if size else 224


def kind_of(family: str) -> str:
    """CNN, mobile, ViT, hybrid or MLP for a timm module; 'other' for one not sorted here."""
    return next((kind for kind, modules in KINDS.items() if family in modules), "other" if family != "?" else "?")


COLUMNS = ["model", "kind", "family", "params_m", "gmacs", "top1_nokd", "top1_kd", "gain", "usi_published",
           "agreement_nokd", "agreement_kd", "kl_kd", "ece_nokd", "ece_kd", "nll_nokd", "nll_kd", "train_img_s", "infer_img_s", "note"]


def model_cost(name: str, num_classes: int, input_size: int, device: torch.device, batch: int = 64,
               runs: int = 5, **kwargs) -> dict:
    """Params and GMACs of one forward at input_size, and eval-mode images/s (median of `runs`; bf16
    autocast on a GPU, fp32 on a CPU: infer_precision says which)."""
    model = None
    if "img_size" not in kwargs:  # built as the run builds it (usi.models.create_student): for its input size
        try:
            model = timm_model(name, num_classes=num_classes, img_size=input_size, **kwargs)
        except TypeError:  # a CNN takes any size
            pass
    model = (model or timm_model(name, num_classes=num_classes, **kwargs)).eval().to(device)
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    macs = forward_macs(model, input_size)
    cuda = device.type == "cuda"
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for i in range(runs + 1):
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gmacs": macs / 1e9, "infer_img_s": batch / statistics.median(times),
            "infer_precision": f"{'bf16' if cuda else 'fp32'} {device.type} batch {batch}"}


def row(model: str, *, nokd: dict | None, kd: dict | None, cost: dict | None, note: str = "",
        family: str | None = None) -> dict:
    """nokd / kd: evaluation metrics of the best weights ({top1, ece, agreement, kl}); train_img_s
    comes from the KD run's summary when given as kd['train_img_s']."""
    nokd, kd, cost = nokd or {}, kd or {}, cost or {}
    family = family or family_of(model)
    out = {"model": model, "kind": kind_of(family), "family": family, "params_m": cost.get("params_m"),
           "gmacs": cost.get("gmacs"), "top1_nokd": nokd.get("top1"), "top1_kd": kd.get("top1"),
           "gain": None, "usi_published": PUBLISHED.get(model), "agreement_nokd": nokd.get("agreement"),
           "agreement_kd": kd.get("agreement"), "kl_kd": kd.get("kl"), "ece_nokd": nokd.get("ece"),
           "ece_kd": kd.get("ece"), "nll_nokd": nokd.get("nll"), "nll_kd": kd.get("nll"),
           "train_img_s": kd.get("train_img_s", nokd.get("train_img_s")),
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
          cell: Callable[[object, str], str] = cell, draw: Callable | None = None,
          meta: dict | None = None) -> dict[str, Path]:
    """<out_dir>/<stem>.md (the columns any row fills), .csv (every column), .json (the rows whole, with
    meta) and .png (draw(rows, path, title); this module's speed-accuracy plot unless a study draws its
    own): every study writes here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json",
             "png": out_dir / f"{stem}.png"}
    # each file written whole under a fresh name, then renamed: never through a link planted at its name
    text_file(paths["md"], f"{title}\n\n{markdown(filled(columns, rows), rows, cell)}\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    text_file(paths["csv"], buffer.getvalue())
    text_file(paths["json"], json.dumps(json_safe({"title": title, **(meta or {}), "rows": rows}), indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        drawn = Path(tmp) / paths["png"].name
        (draw or plot)(rows, drawn, title)
        atomic_write(paths["png"], lambda t: shutil.copyfile(drawn, t))
    return paths


def text_file(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def filled(columns: list[str], rows: list[dict]) -> list[str]:
    """The columns some row has a value in."""
    return [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]


def show(title: str, text: str, paths: dict[str, Path]) -> None:
    """A study's closing words on the console: its title, its table, the files written."""
    written = f"written: {', '.join(str(p) for p in paths.values())}"
    lines = [*title.split("\n"), "", *text.split("\n"), "", written]
    print("\n" + "\n".join(printable(line) for line in lines))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Top-1 without KD (open) and with KD (filled) against inference images/s (log), an arrow from one
    to the other, error bars where the rows have standard errors, every point labelled."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for r in rows:
        speed = r.get("infer_img_s")
        if not speed:
            continue
        nokd, kd = r.get("top1_nokd"), r.get("top1_kd")
        if nokd is not None:
            ax.errorbar(speed, nokd, yerr=r.get("top1_nokd_se"), fmt="o", mfc="white", color="tab:blue", capsize=3)
        if kd is not None:
            ax.errorbar(speed, kd, yerr=r.get("top1_kd_se"), fmt="o", color="tab:red", capsize=3)
        if nokd is not None and kd is not None:
            ax.annotate("", xy=(speed, kd), xytext=(speed, nokd), arrowprops={"arrowstyle": "->", "color": "gray"})
        top = max(v for v in (nokd, kd, -1e9) if v is not None)
        if top > -1e9:
            ax.annotate(r["model"], (speed, top), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("inference images/s (log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title.splitlines()[0][:90], fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.plot([], [], "o", mfc="white", color="tab:blue", label="no KD")
    ax.plot([], [], "o", color="tab:red", label="KD")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
