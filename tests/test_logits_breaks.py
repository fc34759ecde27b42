"""Method-level checks of the classifier family against independent computations.

Each test builds a distiller on tiny linear models, runs one ``training_step`` and compares the loss
with the method's objective written out sample by sample and class by class in plain Python (float64),
so it fails if a method's objective is replaced by plain KD or CE, or if its distinguishing piece
(warm-up, label smoothing, ranking, kept fraction and α(f), target mixture, ...) is broken.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.core.distiller import TaskInfo
from distill.tasks.base import ArrayDataset

C = 4


# ----------------------------------------------------------------------------- plain-Python helpers


def _rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().tolist()


def _softmax(v: list[float], T: float = 1.0) -> list[float]:
    m = max(x / T for x in v)
    e = [math.exp(x / T - m) for x in v]
    return [x / sum(e) for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def _kd(s: list[float], t: list[float], T: float) -> float:
    return T * T * _kl(_softmax(t, T), _softmax(s, T))


def _soft_ce(s: list[float], q: list[float]) -> float:
    p = _softmax(s)
    return -sum(a * math.log(b) for a, b in zip(q, p))


def _ce(s: list[float], y: int, eps: float = 0.0) -> float:
    return _soft_ce(s, [(1 - eps) * (c == y) + eps / len(s) for c in range(len(s))])


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _models(seed: int = 0, d: int = 5) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student, teacher = nn.Linear(d, C), nn.Linear(d, C)
    with torch.no_grad():
        teacher.weight.mul_(4.0)  # a confident, informative teacher
    return student, teacher


def _batch(n: int = 6, d: int = 5, unlabeled: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    if unlabeled:
        y[-2:] = -1
    return {"x": torch.randn(n, d, generator=g), "y": y, "index": torch.arange(n)}


def _info(n: int = 6, d: int = 5, **kw) -> TaskInfo:
    return TaskInfo(num_classes=C, num_train=n, input_shape=(d,), **kw)


def _loss(d, batch) -> float:
    return d.training_step(batch).losses["student"].item()


def _logits(d, batch) -> tuple[list[list[float]], list[list[float]]]:
    with torch.no_grad():
        return _rows(d.student(batch["x"])), _rows(d.teacher(batch["x"]))


# ------------------------------------------------------------------------------------------ ce, kd


def test_ce_label_smoothing_by_hand():
    from distill.logits.methods.ce import CEParams, CrossEntropy

    student, _ = _models()
    batch = _batch(unlabeled=False)
    for eps in (0.0, 0.3):
        d = CrossEntropy(student, None, CEParams(label_smoothing=eps), _info())
        with torch.no_grad():
            s = _rows(student(batch["x"]))
        ref = _mean([_ce(r, int(y), eps) for r, y in zip(s, batch["y"])])
        assert _loss(d, batch) == pytest.approx(ref, rel=1e-6)


def test_kd_by_hand():
    from distill.logits.methods.kd import HintonKD, KDParams

    student, teacher = _models()
    batch = _batch()
    d = HintonKD(student, teacher, KDParams(temperature=3.0, ce_weight=0.3, kd_weight=0.7), _info())
    s, t = _logits(d, batch)
    y = batch["y"].tolist()
    ce = _mean([_ce(s[i], y[i]) for i in range(6) if y[i] >= 0])
    kd = _mean([_kd(s[i], t[i], 3.0) for i in range(6)])
    assert _loss(d, batch) == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-6)


def _zscore(v: list[float]) -> list[float]:
    """S35 Eq. 7 with the unbiased std (the official ``normalize``)."""
    m = _mean(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return [(x - m) / (sd + 1e-7) for x in v]


def test_kd_with_logit_standardization_by_hand():
    from distill.logits.methods.kd import HintonKD, KDParams

    student, teacher = _models()
    batch = _batch()
    d = HintonKD(student, teacher, KDParams(temperature=2.0, ce_weight=0.0, kd_weight=1.0, standardize=True), _info())
    s, t = _logits(d, batch)
    ref = _mean([_kd(_zscore(s[i]), _zscore(t[i]), 2.0) for i in range(6)])
    assert _loss(d, batch) == pytest.approx(ref, rel=1e-5)
    assert abs(ref - _mean([_kd(s[i], t[i], 2.0) for i in range(6)])) > 1e-2  # standardization matters here


# --------------------------------------------------------------------------------------------- dkd


def _dkd_by_hand(s: list[float], t: list[float], y: int, alpha: float, beta: float, T: float) -> float:
    ps, pt = _softmax(s, T), _softmax(t, T)
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    others = [c for c in range(len(s)) if c != y]
    nckd = _kl(_softmax([t[c] for c in others], T), _softmax([s[c] for c in others], T))
    return T * T * (alpha * tckd + beta * nckd)


def test_dkd_warmup_is_min_of_one_based_epoch_over_warmup_exactly():
    from distill.logits.methods.dkd import DecoupledKD, DKDParams

    student, teacher = _models()
    batch = _batch()
    d = DecoupledKD(student, teacher, DKDParams(alpha=0.5, beta=2.0, temperature=2.0, ce_weight=0.4,
                                                 warmup_epochs=4), _info())
    s, t = _logits(d, batch)
    y = [yy if yy >= 0 else max(range(C), key=lambda c: t[i][c]) for i, yy in enumerate(batch["y"].tolist())]
    ce = _mean([_ce(s[i], y[i]) for i in range(4)])  # the labeled samples only
    dkd = _mean([_dkd_by_hand(s[i], t[i], y[i], 0.5, 2.0, 2.0) for i in range(6)])
    for epoch, warm in ((0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (4, 1.0), (9, 1.0)):  # mdistiller: (epoch+1)/W
        d.on_epoch_start(epoch)
        step = d.training_step(batch)
        assert step.metrics["warmup"] == pytest.approx(warm, abs=1e-12)
        assert step.losses["student"].item() == pytest.approx(0.4 * ce + warm * dkd, rel=1e-6)
    d0 = DecoupledKD(student, teacher, DKDParams(warmup_epochs=0), _info())
    assert d0.training_step(batch).metrics["warmup"] == 1.0


def test_dkd_with_logit_standardization_by_hand():
    from distill.logits.methods.dkd import DecoupledKD, DKDParams

    student, teacher = _models()
    batch = _batch()
    p = DKDParams(alpha=1.0, beta=4.0, temperature=2.0, ce_weight=0.0, warmup_epochs=0, standardize=True)
    d = DecoupledKD(student, teacher, p, _info())
    s, t = _logits(d, batch)
    y = [yy if yy >= 0 else max(range(C), key=lambda c: t[i][c]) for i, yy in enumerate(batch["y"].tolist())]
    ref = _mean([_dkd_by_hand(_zscore(s[i]), _zscore(t[i]), y[i], 1.0, 4.0, 2.0) for i in range(6)])
    assert _loss(d, batch) == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------------------------- pld


def _pld_by_hand(s: list[float], t: list[float], y: int, tau: float) -> float:
    rest = sorted((c for c in range(len(s)) if c != y), key=lambda c: (-t[c], c))
    perm = [y] + rest
    w = _softmax(t, tau)
    total = 0.0
    for k, c in enumerate(perm):
        tail = math.log(sum(math.exp(s[j]) for j in perm[k:]))
        total += w[c] * (tail - s[c])
    return total


def test_pld_step_by_hand():
    from distill.logits.methods.pld import PLDParams, PlackettLuceKD

    student, teacher = _models()
    batch = _batch()
    d = PlackettLuceKD(student, teacher, PLDParams(teacher_temperature=2.0), _info())
    s, t = _logits(d, batch)
    y = [yy if yy >= 0 else max(range(C), key=lambda c: t[i][c]) for i, yy in enumerate(batch["y"].tolist())]
    ref = _mean([_pld_by_hand(s[i], t[i], y[i], 2.0) for i in range(6)])
    assert _loss(d, batch) == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------------------- pruned_kd


def test_pruned_kd_step_on_the_kept_samples_with_alpha_of_f():
    from distill.logits.methods.pruned_kd import PrunedKD, PrunedKDParams

    student, teacher = _models()
    n = 10
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, C, (n,), generator=g)
    batch = {"x": x, "y": y, "index": torch.arange(n)}
    info = _info(n, train=ArrayDataset(x, y))
    # f = 0.4, α at full data 0.2: α(f) = 1 − (1 − 0.2)·0.4 = 0.68 (S27: α rises as f falls)
    torch.manual_seed(0)
    d = PrunedKD(student, teacher, PrunedKDParams(fraction=0.4, kd_weight_at_full_data=0.2, temperature=2.0), info)
    keep = [i for i in range(n) if bool(d.keep[i])]
    assert len(keep) == 4  # round(0.4 · 10)
    s, t = _logits(d, batch)
    ce = _mean([_ce(s[i], int(y[i])) for i in keep])
    kd = _mean([_kd(s[i], t[i], 2.0) for i in keep])
    step = d.training_step(batch)
    assert step.metrics["kd_weight"] == pytest.approx(0.68)
    assert step.losses["student"].item() == pytest.approx(0.32 * ce + 0.68 * kd, rel=1e-6)
    # an explicit kd_weight overrides the tie to the fraction
    d2 = PrunedKD(student, teacher, PrunedKDParams(fraction=0.4, kd_weight=0.1, temperature=2.0), info)
    keep2 = [i for i in range(n) if bool(d2.keep[i])]
    ref2 = 0.9 * _mean([_ce(s[i], int(y[i])) for i in keep2]) + 0.1 * _mean([_kd(s[i], t[i], 2.0) for i in keep2])
    assert _loss(d2, batch) == pytest.approx(ref2, rel=1e-6)


# ---------------------------------------------------------------------------------------- self_distill


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_self_distill_step_fits_the_weighted_target(kind):
    from distill.logits.methods.self_distill import SelfDistill, SelfDistillParams

    student, teacher = _models()
    batch = _batch(unlabeled=False)
    xi = 0.3
    d = SelfDistill(student, teacher, SelfDistillParams(label_weight=xi, loss=kind), _info())
    s, t = _logits(d, batch)
    per = []
    for i, yy in enumerate(batch["y"].tolist()):
        pt = _softmax(t[i])
        q = [xi * (c == yy) + (1 - xi) * pt[c] for c in range(C)]
        if kind == "mse":
            per.append(sum((a - b) ** 2 for a, b in zip(_softmax(s[i]), q)))
        else:
            per.append(_soft_ce(s[i], q))
    assert _loss(d, batch) == pytest.approx(_mean(per), rel=1e-6)


# ------------------------------------------------------------------------------------------ recursive


def test_recursive_step_mixes_teacher_and_previous_generation():
    from distill.logits.methods.recursive import RecursiveDistillation, RecursiveParams

    student, teacher = _models()
    batch = _batch()
    p = RecursiveParams(generations=2, epochs_per_generation=1, anchor_weight=0.3, temperature=2.0,
                        ce_weight=0.2, kd_weight=0.8)
    val = ArrayDataset(torch.randn(8, 5), torch.randint(0, C, (8,)))
    d = RecursiveDistillation(student, teacher, p, _info(val=val))
    with torch.no_grad():
        prev = _rows(d.previous(batch["x"]))  # the starting student, frozen at the switch
    d.on_train_start(4, 2)
    d.on_epoch_start(1)  # generation 1: the previous student is the copy taken at the switch
    with torch.no_grad():
        student.weight.add_(0.5)  # the student moves on; the previous generation must not
    s, t = _logits(d, batch)
    y = batch["y"].tolist()
    kd = []
    for i in range(6):
        q = [0.3 * a + 0.7 * b for a, b in zip(_softmax(t[i], 2.0), _softmax(prev[i], 2.0))]
        kd.append(4.0 * _kl(q, _softmax(s[i], 2.0)))
    ce = _mean([_ce(s[i], y[i]) for i in range(6) if y[i] >= 0])
    assert _loss(d, batch) == pytest.approx(0.2 * ce + 0.8 * _mean(kd), rel=1e-6)


# ------------------------------------------------------------------------------------------- taid


def test_taid_step_uses_the_schedules_t():
    from distill.logits.methods.taid import TAID, TAIDParams

    student, teacher = _models()
    batch = _batch()
    d = TAID(student, teacher, TAIDParams(total_steps=10), _info())
    d.schedule.t.fill_(0.3)
    s, z = _logits(d, batch)
    ref = _mean([_soft_ce(s[i], _softmax([0.7 * a + 0.3 * b for a, b in zip(s[i], z[i])])) for i in range(6)])
    step = d.training_step(batch)
    assert step.losses["student"].item() == pytest.approx(ref, rel=1e-6)
    assert float(step.metrics["t"]) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------- tgeo


def test_tgeo_student_loss_fuses_kd_and_ce_with_the_learned_ratio():
    from distill.logits.methods.tgeo import TGeoKD, TGeoParams

    student, teacher = _models()
    batch = _batch()
    val = ArrayDataset(torch.randn(8, 5), torch.randint(0, C, (8,)))
    d = TGeoKD(student, teacher, TGeoParams(temperature=2.0, hidden=8), _info(val=val))
    torch.manual_seed(3)
    nn.init.normal_(d.ratio_net[-1].weight, std=2.0)  # a ratio network that is not at its α = 0.5 start
    s, t = _logits(d, batch)
    y = batch["y"].tolist()
    pt = [_softmax(r) for r in t]
    # T̄: the class means of the teacher's probabilities over this batch's labeled samples (no history yet)
    tbar = {}
    for c in set(v for v in y if v >= 0):
        members = [pt[i] for i in range(6) if y[i] == c]
        tbar[c] = [sum(col) / len(members) for col in zip(*members)]
    per, alphas = [], []
    for i in range(6):
        if y[i] < 0:
            per.append(_kd(s[i], t[i], 2.0))  # transfer sample: KD alone
            continue
        S, T, G, M = _softmax(s[i]), pt[i], [float(c == y[i]) for c in range(C)], tbar[y[i]]
        edges = [[a - b for a, b in zip(u, v)] for u, v in ((S, T), (S, G), (T, G), (S, M), (T, M), (G, M))]
        feats = [v for e in edges for v in e] + [math.sqrt(sum(v * v for v in e)) for e in edges]
        with torch.no_grad():
            a = torch.sigmoid(d.ratio_net(torch.tensor([feats]))).item()
        alphas.append(a)
        per.append(a * _kd(s[i], t[i], 2.0) + (1 - a) * _ce(s[i], y[i]))
    assert max(abs(a - 0.5) for a in alphas) > 0.05
    assert _loss(d, batch) == pytest.approx(_mean(per), rel=1e-5)


# ------------------------------------------------------------------------------------ unlearn_trigger


def test_unlearn_trigger_uses_only_clean_samples_and_the_triggered_input():
    from distill.logits.methods.unlearn_trigger import UnlearnTrigger, UnlearnTriggerParams
    from distill.tasks.mnist1d_backdoor import apply_trigger

    torch.manual_seed(0)
    d_in = 40
    student, teacher = nn.Linear(d_in, C), nn.Linear(d_in, C)
    p = UnlearnTriggerParams(temperature=2.0, init_from_teacher=False, clean_weight=0.5)
    d = UnlearnTrigger(student, teacher, p, _info(d=d_in))
    batch = _batch(d=d_in)
    clean = [i for i in range(6) if batch["y"][i] < 0]
    with torch.no_grad():
        x = batch["x"]
        s_trig, s, t = _rows(student(apply_trigger(x, p.trigger))), _rows(student(x)), _rows(teacher(x))
    ref = _mean([_kd(s_trig[i], t[i], 2.0) for i in clean]) + 0.5 * _mean([_kd(s[i], t[i], 2.0) for i in clean])
    assert _loss(d, batch) == pytest.approx(ref, rel=1e-6)
