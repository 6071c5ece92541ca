"""Recipe -> objects -> loop -> run directory."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import Mixup, resolve_model_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from usi import checkpoint, distributed
from usi.data import ImageFolder, TrainLoader, eval_loader, eval_transform, train_transform
from usi.data.loader import seed_everything
from usi.data.shards import ShardSplit, ShardTrainLoader, read_index, shard_eval_loader
from usi.engine import Guard, NonFiniteError, Parts, evaluate, train_one_epoch
from usi.errors import UsageError
from usi.logit_cache import teacher_val_logits
from usi.progress import Progress
from usi.recipe import Recipe
from usi.teacher import build_teacher

log = logging.getLogger("usi")

LOWER_IS_BETTER = {"nll", "ece", "kl"}
# Keys that may change when a run is resumed (another machine, a moved dataset): none changes what is
# trained, though a different data.workers gives different augmentation draws from then on.
RESUME_IGNORES = {("run", "resume"), ("run", "stop_after"), ("run", "log_interval"), ("run", "ckpt_every_steps"),
                  ("run", "max_nonfinite"), ("run", "device"), ("data", "root"), ("data", "workers"),
                  ("data", "eval_batch_size"), ("data", "max_bad_samples"), ("data", "train_shards"),
                  ("data", "val_shards")}


# ---------------------------------------------------------------- run directory


def plan_run_dir(recipe: Recipe) -> tuple[Path, Path | None]:
    """Decide where to write and what to resume from; refuse to overwrite. Writes nothing."""
    run_dir = recipe.run_dir()
    last = run_dir / checkpoint.LAST
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    resume_from = None
    if recipe.run.resume == "never":
        if existing:
            raise UsageError(f"run directory {run_dir} already holds a run; pass run.resume=auto to continue it "
                             f"or choose another run.dir")
    elif recipe.run.resume == "auto":
        if existing and (run_dir / "recipe.yaml").is_file():
            check_same_recipe(recipe, run_dir / "recipe.yaml")
        resume_from = last if last.is_file() else None
    else:
        resume_from = Path(recipe.run.resume)
    check_writable(run_dir)
    return run_dir, resume_from


def check_writable(run_dir: Path) -> None:
    """The nearest existing ancestor must be a writable directory (checked before any heavy work)."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"run directory {run_dir} cannot be created: {parent} is not a writable directory")


def create_run_dir(recipe: Recipe, run_dir: Path, dist: distributed.Dist) -> None:
    """Only once everything is built and checked: a failed start leaves nothing behind."""
    distributed.barrier()  # every rank has looked at the directory before rank 0 writes to it
    if dist.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"run directory {run_dir} is not writable ({e.strerror})") from None
        recipe.save(run_dir / "recipe.yaml")
    distributed.barrier()


def check_same_recipe(recipe: Recipe, saved_path: Path) -> None:
    from usi import recipe as recipe_mod

    saved = recipe_mod.from_dict(recipe_mod.read_yaml(saved_path)).to_dict()
    now = recipe.to_dict()
    for section, values in now.items():
        for key, value in values.items():
            if (section, key) not in RESUME_IGNORES and saved.get(section, {}).get(key) != value:
                raise UsageError(f"cannot resume {saved_path.parent}: {section}.{key} was "
                                 f"{saved[section][key]!r}, now {value!r}; use another run.dir")


def setup_logging(run_dir: Path | None, main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if run_dir is not None and main:
        file = logging.FileHandler(run_dir / "log.txt")
        file.setFormatter(fmt)
        log.addHandler(file)


# ---------------------------------------------------------------- building the objects


def load_datasets(data_cfg) -> tuple[ImageFolder, ImageFolder]:
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise UsageError(f"data.root={data_cfg.root!r} does not exist (expected {root}/train and {root}/val)")
    if data_cfg.format == "shards":
        return load_shard_splits(data_cfg, root)
    train = ImageFolder(root / data_cfg.train_split)
    val = ImageFolder(root / data_cfg.val_split, classes=train.classes)
    missing = sorted(set(range(len(train.classes))) - set(val.targets))
    if missing:
        log.warning(f"val split has no images of {len(missing)} classes (e.g. {train.classes[missing[0]]!r})")
    return train, val


def load_shard_splits(data_cfg, root: Path) -> tuple[ShardSplit, ShardSplit]:
    train = ShardSplit(*read_index(root / data_cfg.train_split, data_cfg.train_shards))
    val = ShardSplit(*read_index(root / data_cfg.val_split, data_cfg.val_shards))
    if val.classes != train.classes:
        raise UsageError(f"val shards' classes differ from train shards' ({len(val.classes)} vs {len(train.classes)}); "
                         f"write val with tools/make_shards.py --classes-from <train folder>")
    return train, val


def create_student(model_cfg, num_classes: int, input_size: int | None) -> torch.nn.Module:
    """The student, built for `input_size` when its constructor takes img_size (ViTs, MLP-Mixers)."""
    kwargs = dict(model_cfg.kwargs)
    if model_cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    try:
        if input_size and "img_size" not in kwargs:
            try:
                return timm.create_model(model_cfg.name, num_classes=num_classes, img_size=input_size, **kwargs)
            except TypeError:
                pass  # a CNN: any input size works without telling it
        return timm.create_model(model_cfg.name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UsageError(f"model.kwargs {kwargs} do not fit {model_cfg.name}: {e}") from None


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on GPU as the recipe says; CPU always runs fp32."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def make_val_loader(data_cfg, val_set, transform, dist: distributed.Dist, mean, std):
    """The exact (every sample once across ranks) validation loader, from an image folder or shards."""
    batch = data_cfg.eval_batch_size or 2 * data_cfg.batch_size
    if isinstance(val_set, ShardSplit):
        loader = shard_eval_loader(val_set.urls, transform, batch, data_cfg.workers, dist.world, dist.rank,
                                   mean, std, dist.device)
        val_set.bad = loader.dataset.bad
        return loader
    val_set.transform = transform
    return eval_loader(val_set, batch, data_cfg.workers, dist.world, dist.rank, mean, std, dist.device)


def batch_plan(recipe: Recipe, world: int) -> tuple[int, float, str]:
    """(gradient accumulation steps, lr) that reconcile this world size with optim.global_batch."""
    per_step = recipe.data.batch_size * world
    target, lr, rule = recipe.optim.global_batch, recipe.optim.lr, recipe.optim.batch_rule
    if rule == "accumulate":
        if target % per_step:
            raise UsageError(f"optim.global_batch={target} is not a multiple of data.batch_size x processes "
                             f"= {recipe.data.batch_size} x {world}; change one, or set optim.batch_rule=linear")
        accum = target // per_step
        return accum, lr, f"global batch {target} = {recipe.data.batch_size} x {world} processes x {accum} accumulation"
    scale = {"linear": per_step / target, "sqrt": math.sqrt(per_step / target), "none": 1.0}[rule]
    return 1, lr * scale, (f"global batch {per_step} (recipe: {target}), "
                           f"lr {lr:g} x {scale:.4g} ({rule}) = {lr * scale:g}")


@dataclass
class Run:
    recipe: Recipe
    dist: distributed.Dist
    run_dir: Path
    parts: Parts
    train_loader: TrainLoader
    val_loader: object
    train_set: ImageFolder
    val_set: ImageFolder
    steps: int
    epochs: int
    params: int


def build(recipe: Recipe, dist: distributed.Dist, run_dir: Path) -> Run:
    train_set, val_set = load_datasets(recipe.data)
    num_classes = len(train_set.classes)
    seed_everything(recipe.run.seed)
    raw = create_student(recipe.model, num_classes, recipe.data.input_size)
    data_cfg = resolve_model_data_config(raw)
    input_size = recipe.data.input_size or data_cfg["input_size"][-1]
    mean, std = data_cfg["mean"], data_cfg["std"]
    device = dist.device
    amp = amp_dtype(recipe.run.amp, device)

    teacher = None
    if recipe.kd:
        teacher = build_teacher(recipe.teacher, num_classes, mean, std, device, recipe.run.channels_last)
    raw.to(device)
    if recipe.run.channels_last:
        raw.to(memory_format=torch.channels_last)

    t_train = train_transform(recipe.aug, input_size, mean, std)
    t_eval = eval_transform(recipe.aug, input_size, mean, std)
    if isinstance(train_set, ShardSplit):
        train_loader = ShardTrainLoader(train_set.urls, train_set.counts, t_train, recipe.data.batch_size,
                                        recipe.data.workers, dist.world, dist.rank, recipe.aug.repeats,
                                        recipe.run.seed, mean, std, device)
        train_set.bad = train_loader.stream.bad
    else:
        train_set.transform = t_train
        train_loader = TrainLoader(train_set, recipe.data.batch_size, recipe.data.workers, dist.world, dist.rank,
                                   recipe.aug.repeats, recipe.run.seed, mean, std, device)
    val_loader = make_val_loader(recipe.data, val_set, t_eval, dist, mean, std)
    steps = train_loader.steps_per_epoch()
    if recipe.run.max_steps:
        steps = min(steps, recipe.run.max_steps)
    if steps == 0:
        raise UsageError(f"data.batch_size={recipe.data.batch_size} x {dist.world} processes is larger than one "
                         f"epoch of {len(train_set)} training samples")

    accum, lr, plan = batch_plan(recipe, dist.world)
    log.info(plan)
    if steps % accum:
        log.warning(f"{steps} steps per epoch is not a multiple of {accum} accumulation steps; "
                    f"the last {steps % accum} steps of each epoch carry gradient into the next")
    fused = recipe.optim.name in ("adamw", "adam") and all(p.dtype == torch.float32 for p in raw.parameters())
    try:
        optimizer = create_optimizer_v2(raw, opt=recipe.optim.name, lr=lr, weight_decay=recipe.optim.weight_decay,
                                        eps=recipe.optim.eps, **({"fused": True} if fused else {}))
    except (ValueError, AssertionError) as e:
        raise UsageError(f"optim.name={recipe.optim.name!r}: {e}") from None
    s = recipe.sched
    scheduler, epochs = create_scheduler_v2(
        optimizer, sched=s.name, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
        min_lr=s.min_lr, cooldown_epochs=s.cooldown_epochs, step_on_epochs=False,
        updates_per_epoch=max(1, steps // accum))
    ema = ModelEmaV3(raw, decay=recipe.ema.decay) if recipe.ema.enabled else None

    student = raw
    if dist.distributed:
        student = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if recipe.run.compile:
        student = torch.compile(student)
        if teacher is not None:
            teacher.model = torch.compile(teacher.model)

    a = recipe.aug
    mixup = None
    if (a.mixup_alpha > 0 or a.cutmix_alpha > 0) and a.mixup_prob > 0:
        if recipe.data.batch_size % 2:
            raise UsageError(f"data.batch_size={recipe.data.batch_size} must be even for mixup/cutmix")
        mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                      switch_prob=a.mixup_switch_prob, mode=a.mixup_mode, label_smoothing=a.label_smoothing,
                      num_classes=num_classes)
    parts = Parts(student=student, raw=raw, teacher=teacher, ema=ema, optimizer=optimizer, scheduler=scheduler,
                  scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None, mixup=mixup,
                  num_classes=num_classes, device=device, amp_dtype=amp,
                  channels_last=recipe.run.channels_last, accum_steps=accum, clip_grad=recipe.optim.clip_grad,
                  kd_weight=recipe.loss.kd_weight, temperature=recipe.loss.temperature,
                  hard_label=recipe.loss.hard_label, label_smoothing=a.label_smoothing)
    params = sum(p.numel() for p in raw.parameters())
    log.info(f"student {recipe.model.name}: {params / 1e6:.2f}M params, input {input_size}, {num_classes} classes, "
             f"{len(train_set)} train / {len(val_set)} val images, {steps} steps x {epochs} epochs"
             + (f", teacher {recipe.teacher.name}" if teacher is not None else ", no teacher"))
    return Run(recipe, dist, run_dir, parts, train_loader, val_loader, train_set, val_set, steps, epochs, params)


# ---------------------------------------------------------------- checkpoints


def state_of(run: Run, epoch: int, step: int, num_updates: int, best: dict) -> dict:
    p = run.parts
    return {
        "recipe": run.recipe.to_yaml(),
        "student": p.raw.state_dict(),
        "ema": p.ema.module.state_dict() if p.ema is not None else {},
        "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(),
        "scaler": p.scaler.state_dict() if p.scaler is not None else {},
        "classes": run.train_set.classes,
        "epoch": epoch,  # the epoch to run next (or the one in progress)
        "step": step,  # the next step within it
        "num_updates": num_updates,
        "best": best,
    }


def restore(run: Run, path: Path) -> tuple[int, int, int, dict]:
    state = checkpoint.load(path)
    p = run.parts
    try:
        p.raw.load_state_dict(state["student"])
        if p.ema is not None and state["ema"]:
            p.ema.module.load_state_dict(state["ema"])
        p.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {path} does not fit this recipe's model/optimizer: "
                         f"{str(e).strip().splitlines()[0][:200]}") from None
    p.scheduler.load_state_dict(state["scheduler"])
    if p.scaler is not None and state["scaler"]:
        p.scaler.load_state_dict(state["scaler"])
    log.info(f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step']}")
    return state["epoch"], state["step"], state["num_updates"], state["best"]


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new < old if metric in LOWER_IS_BETTER else new > old


def rank_and_export(run: Run, metrics: dict, epoch: int, best: dict) -> dict:
    """Rank raw and EMA by run.best_metric; export the winner's weights if it beats the best so far."""
    metric = run.recipe.run.best_metric
    candidates = {name: m[metric] for name, m in metrics.items() if metric in m}
    if not candidates:
        return best
    name = min(candidates, key=candidates.get) if metric in LOWER_IS_BETTER else max(candidates, key=candidates.get)
    if not better(metric, candidates[name], best.get("value")):
        return best
    model = run.parts.raw if name == "raw" else run.parts.ema.module
    best = {"metric": metric, "value": candidates[name], "weights": name, "epoch": epoch + 1}
    if run.dist.main:
        checkpoint.export_weights(model.state_dict(), run.run_dir / checkpoint.BEST, metadata={
            "recipe": run.recipe.to_yaml(), "model": run.recipe.model.name, "weights": name,
            "classes": json.dumps(run.train_set.classes),
            "epoch": str(epoch + 1), metric: repr(candidates[name])})
    return best


# ---------------------------------------------------------------- the loop


def train(recipe: Recipe) -> dict:
    dist = distributed.setup(recipe.run.device)
    try:
        setup_logging(None, dist.main)
        run_dir, resume_from = plan_run_dir(recipe)
        run = build(recipe, dist, run_dir)
        create_run_dir(recipe, run_dir, dist)
        setup_logging(run_dir, dist.main)
        return loop(run, resume_from)
    finally:
        distributed.cleanup()


def loop(run: Run, resume_from: Path | None) -> dict:
    recipe, p, dist = run.recipe, run.parts, run.dist
    epoch, start_step, num_updates, best = 0, 0, 0, {}
    metrics_file = run.run_dir / "metrics.jsonl"
    if resume_from is not None:
        epoch, start_step, num_updates, best = restore(run, resume_from)
        done = run.run_dir / "summary.json"
        if epoch >= run.epochs and done.is_file():
            log.info(f"{run.run_dir} already finished all {run.epochs} epochs; nothing to do")
            return json.loads(done.read_text())
        if dist.main:
            keep_metrics_until(metrics_file, epoch)
    start = time.time()
    teacher_metrics, teacher_logits = {}, None
    if p.teacher is not None:
        # The teacher's val metrics, once; this rank's logits serve every epoch's fidelity metrics.
        t0 = time.time()
        teacher_metrics, teacher_logits, hit = teacher_val_logits(
            p.teacher, recipe.teacher, run.val_set, run.val_loader, p, recipe.run.ece_bins, dist)
        log.info(f"teacher val top-1 {teacher_metrics['top1']:.2f} "
                 f"({'cached' if hit else 'computed and cached'}, {time.time() - t0:.1f} s)")
    guard = Guard(dist.device, recipe.run.max_nonfinite)
    progress = Progress(dist.main)
    images_per_step = recipe.data.batch_size * dist.world
    last_metrics, train_stats = {}, {}

    def on_update(next_step: int, updates: int) -> None:
        every = recipe.run.ckpt_every_steps
        if every and updates % every == 0 and next_step < run.steps and dist.main:
            checkpoint.save(state_of(run, epoch, next_step, updates, best), run.run_dir / checkpoint.LAST)

    stop_at = min(run.epochs, epoch + recipe.run.stop_after) if recipe.run.stop_after else run.epochs
    while epoch < stop_at:
        t0 = time.time()
        batches = run.train_loader.epoch(epoch, start_step)
        try:
            train_stats, num_updates = train_one_epoch(
                p, batches, epoch, run.epochs, start_step, run.steps, num_updates, guard, recipe.run.log_interval,
                progress, images_per_step, on_update)
        except NonFiniteError as e:
            last = run.run_dir / checkpoint.LAST
            raise NonFiniteError(f"{e}; last good checkpoint: {last if last.is_file() else 'none yet'}") from None
        start_step = 0
        bad = bad_images(run)
        record = {"epoch": epoch + 1, "train": {**train_stats, "bad_images": bad, "time_s": time.time() - t0}}
        if bad > recipe.data.max_bad_samples:
            raise UsageError(f"{bad} unreadable images so far exceeds data.max_bad_samples="
                             f"{recipe.data.max_bad_samples}; see the warnings above for their paths")
        if (epoch + 1) % recipe.run.eval_every == 0 or epoch + 1 == run.epochs:
            models = {"raw": p.raw} | ({"ema": p.ema.module} if p.ema is not None else {})
            t_eval = time.time()
            last_metrics, _ = evaluate(models, run.val_loader, p, recipe.run.ece_bins, teacher_logits=teacher_logits)
            record["eval_time_s"] = time.time() - t_eval
            best = rank_and_export(run, last_metrics, epoch, best)
            record.update(last_metrics)
        epoch += 1
        if dist.main:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoint.save(state_of(run, epoch, 0, num_updates, best), run.run_dir / checkpoint.LAST)
            log.info(epoch_line(record))
    if epoch < run.epochs:
        log.info(f"stopped after epoch {epoch} (run.stop_after={recipe.run.stop_after}); "
                 f"continue with run.resume=auto")
        return {"stopped_at_epoch": epoch}
    summary = {
        "model": recipe.model.name, "teacher": recipe.teacher.name if recipe.kd else None,
        "params": run.params, "epochs": run.epochs, "num_classes": len(run.train_set.classes),
        "best": best, "final": last_metrics, "teacher_metrics": teacher_metrics,
        "train_img_per_s": train_stats.get("img_per_s"), "wall_time_s": time.time() - start,
    }
    if dist.main:
        checkpoint.atomic_write(run.run_dir / "summary.json",
                                lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        log.info(f"done: best {best.get('metric')} {best.get('value', float('nan')):.2f} "
                 f"({best.get('weights')} weights, epoch {best.get('epoch')}) -> {run.run_dir}")
    return summary


def keep_metrics_until(path: Path, epochs_done: int) -> None:
    """Drop metrics lines of epochs the checkpoint does not cover (written just before a crash)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line)["epoch"] <= epochs_done]
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


def bad_images(run: Run) -> int:
    """Unreadable images met by any rank: distinct files for folders (a file two ranks met counts
    once), corrupt samples read for shards (summed over ranks)."""
    total = 0
    for split in (run.train_set, run.val_set):
        if isinstance(split, ShardSplit):
            total += int(distributed.sum_across(split.bad.sum().to(run.dist.device)).item())
        else:
            total += int(distributed.max_across(split.bad.to(run.dist.device, torch.int32)).sum().item())
    return total


def epoch_line(record: dict) -> str:
    t = record["train"]
    text = f"epoch {record['epoch']}: task {t['task_loss']:.4f} kd {t['kd_loss']:.4f} {t['img_per_s']:.0f} img/s"
    for name in ("raw", "ema"):
        if name in record:
            m = record[name]
            text += f" | {name} top1 {m['top1']:.2f} top5 {m['top5']:.2f} nll {m['nll']:.3f}"
            if "agreement" in m:
                text += f" agree {m['agreement']:.1f}"
    return text
