import math

import pytest
import torch

from usi.distill.loss import kd_kl, usi_loss


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_usi_loss_matches_a_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])  # mixed targets
    ce = kl = 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        ps, pt = softmax(si), softmax(ti)
        ce += -sum(a * math.log(b) for a, b in zip(yi, ps))
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    task, kd = usi_loss(s, y, t, kd_weight=5.0, temperature=1.0)
    assert math.isclose(task.item(), ce / 2, rel_tol=1e-6)
    assert math.isclose(kd.item(), 5.0 * kl / 2, rel_tol=1e-6)  # batchmean: sum / batch size


def test_temperature_scales_by_t_squared():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    T = 3.0
    manual = torch.nn.functional.kl_div((s / T).log_softmax(1), (t / T).softmax(1), reduction="batchmean") * T * T
    assert torch.allclose(kd_kl(s, t, T), manual, atol=1e-6)


def test_kd_only_drops_the_hard_label_term_and_no_teacher_drops_kd():
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.softmax(torch.randn(2, 3), 1)
    task, kd = usi_loss(s, y, t, hard_label=False)
    assert task.item() == 0.0 and kd.item() > 0
    task, kd = usi_loss(s, y, None)
    assert task.item() > 0 and kd.item() == 0.0


def test_kl_is_computed_in_fp32_from_low_precision_logits():
    s, t = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16()
    out = kd_kl(s, t)
    assert out.dtype == torch.float32
    assert torch.allclose(out, kd_kl(s.float(), t.float()))


def test_hintons_weighting_is_alpha_ce_plus_one_minus_alpha_t_squared_kl():
    from usi.distill.loss import DistillLoss
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.softmax(torch.randn(4, 6), 1)
    ce, _ = usi_loss(s, y, None)
    T = 4.0
    task, kd = DistillLoss(weighting="hinton", alpha=0.3, temperature=T)(s, y, t)
    assert torch.allclose(task, 0.3 * ce)
    assert torch.allclose(kd, 0.7 * kd_kl(s, t, T))  # kd_kl includes the T^2 factor
    task, kd = DistillLoss(weighting="hinton", alpha=0.3)(s, y, None)  # no teacher: the same baseline as usi's
    assert torch.allclose(task, ce) and kd.item() == 0.0


def test_the_recipe_chooses_the_weighting_and_refuses_mixed_settings():

    from usi import recipe as R
    from usi.errors import UsageError
    from usi.models import Compute
    from usi.training.build import step_config
    recipe = R.load(None, ["loss.weighting=hinton", "loss.alpha=0.9", "loss.temperature=4"])
    loss = step_config(recipe, Compute(torch.device("cpu")), 10, 1).loss
    assert (loss.weighting, loss.alpha, loss.temperature) == ("hinton", 0.9, 4.0)
    for bad in (["loss.weighting=hinton", "loss.kd_weight=2"], ["loss.weighting=hinton", "loss.hard_label=false"]):
        with pytest.raises(UsageError, match="weighs the terms by loss.alpha alone"):
            R.load(None, bad)


# ---------------------------------------------------------------- BCE (loss.task=bce)


def test_bce_task_term_is_timms_binary_cross_entropy_on_the_same_batch():
    from timm.data import Mixup
    from timm.data.mixup import mixup_target
    from timm.loss import BinaryCrossEntropy

    from usi.distill.loss import DistillLoss
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    for smoothing in (0.0, 0.1):
        for thresh in (None, 0.2):
            # unmixed: timm one-hot encodes and smooths the labels itself; usi's targets arrive smoothed
            timm_value = BinaryCrossEntropy(smoothing=smoothing, target_threshold=thresh)(logits, labels)
            y = mixup_target(labels, 10, smoothing=smoothing)
            task, kd = DistillLoss(task="bce", bce_target_thresh=thresh)(logits, y, None)
            assert torch.allclose(task, timm_value, atol=1e-6), (smoothing, thresh)
            assert kd.item() == 0.0
            # mixed: timm's BCE takes Mixup's dense targets as they are (train.py's --bce-loss under mixup)
            mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=smoothing, num_classes=10)
            _, mixed = mix(torch.randn(8, 3, 4, 4), labels)
            task, _ = DistillLoss(task="bce", bce_target_thresh=thresh)(logits, mixed, None)
            assert torch.allclose(task, BinaryCrossEntropy(target_threshold=thresh)(logits, mixed), atol=1e-6)
    # the threshold changes the term (mixed targets of 0.3 become 1, the rest 0), and BCE is not the CE
    soft = DistillLoss(task="bce")(logits, mixed, None)[0]
    assert not torch.allclose(soft, DistillLoss(task="bce", bce_target_thresh=0.2)(logits, mixed, None)[0])
    assert not torch.allclose(soft, DistillLoss()(logits, mixed, None)[0])


def test_bce_keeps_the_kd_term_and_the_recipe_chooses_it():
    from timm.loss import BinaryCrossEntropy

    from usi import recipe as R
    from usi.models import Compute
    from usi.training.build import step_config
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.softmax(torch.randn(4, 6), 1)
    recipe = R.load(None, ["loss.task=bce", "loss.bce_target_thresh=0.25", "loss.kd_weight=3"])
    task, kd = step_config(recipe, Compute(torch.device("cpu")), 6, 1).loss(s, y, t)
    assert torch.allclose(task, BinaryCrossEntropy(smoothing=0.0, target_threshold=0.25)(s, y))
    assert torch.allclose(kd, 3 * kd_kl(s, t))  # the KD term stays the recipe's


def test_bce_trains_and_survives_resume(image_root, tmp_path):
    from conftest import read_jsonl
    from helpers import one_error, train
    bce = ["loss.task=bce", "loss.bce_target_thresh=0.2"]
    assert train(image_root, tmp_path / "run", *bce, "run.stop_after=1").returncode == 0
    one_error(train(image_root, tmp_path / "run", "loss.task=bce", "run.resume=auto"),
              "loss.bce_target_thresh was 0.2, now None")
    one_error(train(image_root, tmp_path / "run", "run.resume=auto"), "loss.task was 'bce', now 'ce'")
    assert train(image_root, tmp_path / "run", *bce, "run.resume=auto").returncode == 0
    epochs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(epochs) == 2 and all(0 < e["train"]["task_loss"] for e in epochs)


# ---------------------------------------------------------------- DeiT's distillation token (loss.distill_token)


def tiny_deit():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=16, patch_size=4, depth=1)
    model.set_distilled_training(True)
    return model.train()


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_the_distillation_token_learns_the_teacher_and_the_class_token_the_mixed_targets(mode):
    from usi.distill.loss import DistillLoss
    model, x = tiny_deit(), torch.randn(4, 3, 16, 16)
    head, dist = model(x)
    t = torch.randn(4, 5) * 3
    y = torch.softmax(torch.randn(4, 5), 1)  # mixed targets
    T = 2.0
    ce = -(y * head.log_softmax(1)).sum(1).mean()
    if mode == "soft":
        pt = (t / T).softmax(1)
        kd = (pt * (pt.log() - (dist / T).log_softmax(1))).sum(1).mean() * T * T
    else:
        kd = -dist.log_softmax(1)[torch.arange(4), t.argmax(1)].mean()
    task, kd_term = DistillLoss(kd_weight=3.0, temperature=T, distill_token=mode)((head, dist), y, t)
    assert torch.allclose(task, ce, atol=1e-6) and torch.allclose(kd_term, 3.0 * kd, atol=1e-5)
    (task + kd_term).backward()  # both heads train, each on its own term
    assert model.head.weight.grad.abs().sum() > 0 and model.head_dist.weight.grad.abs().sum() > 0
    task, kd_term = DistillLoss(weighting="hinton", alpha=0.9, temperature=T, distill_token=mode)((head, dist), y, t)
    assert torch.allclose(task, 0.9 * ce, atol=1e-6) and torch.allclose(kd_term, 0.1 * kd, atol=1e-5)


def test_timms_distilled_model_averages_its_two_heads_in_eval_mode():
    model, x = tiny_deit(), torch.randn(2, 3, 16, 16)  # no dropout: train and eval heads are the same function
    head, dist = model(x)
    assert torch.allclose(model.eval()(x), (head + dist) / 2, atol=1e-6)


def test_a_student_without_a_distillation_head_is_refused_in_one_line(image_root, tmp_path):
    from helpers import one_error, teacher_file, train
    out = train(image_root, tmp_path / "run", "model.name=test_vit", "model.kwargs={patch_size: 4}",
                "teacher.name=test_resnet", f"teacher.weights={teacher_file(tmp_path / 't.safetensors')}",
                "loss.distill_token=soft")
    one_error(out, "loss.distill_token=soft needs a student with a distillation head (timm's deit_*_distilled_*); "
                   "model.name=test_vit has none")
    assert not (tmp_path / "run").exists()


def test_token_distillation_trains_a_deit_end_to_end_and_survives_resume(image_root, tmp_path):
    from safetensors.torch import load_file

    from conftest import read_jsonl
    from helpers import one_error, teacher_file, train
    deit = ["model.name=deit_tiny_distilled_patch16_224", "model.kwargs={patch_size: 4, depth: 1}",
            "teacher.name=test_resnet", f"teacher.weights={teacher_file(tmp_path / 't.safetensors')}",
            "run.max_steps=2"]
    out = train(image_root, tmp_path / "run", *deit, "loss.distill_token=hard", "run.stop_after=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "distillation token: its head learns the teacher's hard label" in out.stderr
    one_error(train(image_root, tmp_path / "run", *deit, "loss.distill_token=soft", "run.resume=auto"),
              "loss.distill_token was 'hard', now 'soft'")
    out = train(image_root, tmp_path / "run", *deit, "loss.distill_token=hard", "run.resume=auto")
    assert out.returncode == 0, out.stderr[-2000:]
    epochs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(epochs) == 2 and all(e["train"]["kd_loss"] > 0 for e in epochs)
    assert "head_dist.weight" in load_file(tmp_path / "run" / "best.safetensors")
