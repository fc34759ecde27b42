"""TAID for language models (S60): the token loss against a direct formula (shift, masks, num_items,
temperature), t = 1 as forward KL + teacher entropy, the detached target, t updated once per optimizer
step from the step's token-mean loss, and a tiny end-to-end run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.core.recipe import RecipeError, TrainConfig, recipe_from_dict
from distill.core.runner import run_recipe
from distill.core.trainer import EpochBatches, Trainer
from distill.errors import MismatchError
from distill.lm.methods.lm_taid import LMTAID, LMTAIDParams
from distill.lm.losses import token_divergence, token_taid_loss
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm

B, T, V = 3, 6, 9


def _data(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    z = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    labels[2, 1:] = -100  # nothing supervised in this row
    return s, z, labels


def _reference(s, z, labels, t, temperature=1.0, num_items=None):
    """Written from S60's definition: shift, then −Σ_v p_t,v log q_v per valid token."""
    s, z, y = s[:, :-1].double(), z[:, :-1].double(), labels[:, 1:]
    mix = ((1 - t) * s + t * z) / temperature
    p_t = mix.exp() / mix.exp().sum(-1, keepdim=True)
    log_q = s / temperature - torch.logsumexp(s / temperature, -1, keepdim=True)
    ce = -(p_t * log_q).sum(-1)
    valid = y != -100
    return (ce * valid).sum() / (valid.sum() if num_items is None else num_items)


@pytest.mark.parametrize("t", [0.0, 0.4, 0.73, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_matches_direct_formula(t, temperature):
    s, z, labels = _data(1)
    n_valid = int((labels[:, 1:] != -100).sum())
    assert n_valid == 3 + 3 + 0  # of 5 scored positions per row: 2 prompt, 2 padding, all masked
    for num_items in (None, 17.0, torch.tensor(17.0)):
        got = token_taid_loss(s, z, labels, t, num_items, temperature)
        ref = _reference(s, z, labels, t, temperature, 17.0 if num_items is not None else None)
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    # t as the schedule's 0-d buffer; float32 inputs are computed in float32 (and return float32)
    got32 = token_taid_loss(s.float(), z.float(), labels, torch.tensor(t), None, temperature)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(_reference(s, z, labels, t, temperature).item(), rel=1e-5)
    # bf16 inputs: float32 math on the rounded logits
    sb, zb = s.bfloat16(), z.bfloat16()
    assert token_taid_loss(sb, zb, labels, t, temperature=temperature).item() == pytest.approx(
        _reference(sb.double(), zb.double(), labels, t, temperature).item(), rel=1e-5)


def test_micro_batches_with_num_items_sum_to_the_big_batch():
    s, z, labels = _data(2)
    n = int((labels[:, 1:] != -100).sum())
    parts = sum(token_taid_loss(s[i : i + 1], z[i : i + 1], labels[i : i + 1], 0.6, n) for i in range(B))
    assert parts.item() == pytest.approx(token_taid_loss(s, z, labels, 0.6).item(), rel=1e-12)


def test_masked_positions_get_no_gradient_and_change_nothing():
    s, z, labels = _data(3)
    s.requires_grad_()
    loss = token_taid_loss(s, z, labels, 0.5)
    (g,) = torch.autograd.grad(loss, s)
    scored = torch.zeros(B, T, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    assert (g[~scored] == 0).all() and (g[scored].abs().sum(-1) > 0).all()
    # garbage (even inf) logits at unscored positions do not change the loss
    s2, z2 = s.detach().clone(), z.clone()
    s2[~scored], z2[~scored] = float("inf"), float("nan")
    assert token_taid_loss(s2, z2, labels, 0.5).item() == loss.item()


def test_t1_is_forward_kl_plus_teacher_entropy():
    s, z, labels = _data(4)
    s.requires_grad_()
    valid = labels[:, 1:] != -100
    p = F.softmax(z[:, :-1] / 1.5, -1)
    entropy = (-(p * p.log()).sum(-1) * valid).sum() / valid.sum()
    taid = token_taid_loss(s, z, labels, 1.0, temperature=1.5)
    fkl = token_divergence(s, z, labels, "forward_kl", temperature=1.5)
    assert taid.item() == pytest.approx((fkl + entropy).item(), rel=1e-12)
    (g1,) = torch.autograd.grad(taid, s)
    (g2,) = torch.autograd.grad(fkl, s)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_gradient_flows_only_through_the_students_log_softmax():
    s, z, labels = _data(5)
    s.requires_grad_()
    z.requires_grad_()  # even a teacher that asks for gradients receives none
    t, tau, n = 0.3, 2.0, 11.0
    loss = token_taid_loss(s, z, labels, t, n, tau)
    loss.backward()
    assert z.grad is None
    # d/ds of −Σ p_t log q with p_t held fixed: (q − p_t) / T per token, / num_items
    sd = s.detach()[:, :-1]
    q = F.softmax(sd / tau, -1)
    p_t = F.softmax(((1 - t) * sd + t * z.detach()[:, :-1]) / tau, -1)
    expected = torch.zeros_like(s)
    expected[:, :-1] = (q - p_t) / tau * (labels[:, 1:] != -100).unsqueeze(-1) / n
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-14)
    # t = 0: the target is the student's own distribution, so the gradient vanishes (yet the loss is its entropy)
    s.grad = None
    (g0,) = torch.autograd.grad(token_taid_loss(s, z.detach(), labels, 0.0), s)
    assert g0.abs().max().item() < 1e-14


def test_loss_errors():
    s, z, labels = _data(6)
    with pytest.raises(MismatchError, match="vocabulary"):
        token_taid_loss(s, z[..., :-1], labels, 0.5)
    with pytest.raises(ValueError, match="labels"):
        token_taid_loss(s, z, labels[:, :-1], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        token_taid_loss(s, z, labels, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="scalar"):
        token_taid_loss(s, z, labels, torch.tensor([0.5, 0.5]))


def test_finite_for_huge_logits():
    s, z, labels = _data(7, torch.float32)
    s, z = 1e4 * s, 1e4 * z
    s.requires_grad_()
    loss = token_taid_loss(s, z, labels, 0.5)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # a −inf student logit (a banned token) where p_t is 0: contributes 0, not nan
    s2 = s.detach().clone()
    s2[..., 0] = float("-inf")
    assert torch.isfinite(token_taid_loss(s2, z, labels, 0.5))


# ------------------------------------------------------------------------------------------- method


def _task(num_train: int = 24):
    return build_arithmetic(ArithmeticParams(num_train=num_train, num_val=4, num_test=4, eval_size=2))


def _method(data, params: LMTAIDParams) -> LMTAID:
    student = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)
    teacher = tiny_causal_lm(None, 24, 1, 2, data.tokenizer, seed=1)
    return LMTAID(student, teacher, params, data.task_info(False))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "trackers": "none", "optimizer": "sgd", "momentum": 0.0,
                          "schedule": "constant", "lr": 0.5, "log_every": 1, **kw})


def test_t_is_updated_once_per_optimizer_step_from_the_steps_token_mean():
    data = _task(24)
    d = _method(data, LMTAIDParams(alpha=0.2, beta=0.5))
    # the loss of step 0 by hand: the big batch of its 4 micro-batches, initial student, t = t_start
    idx = torch.cat(EpochBatches(24, 3, seed=0).epoch(0)[:4])
    big = data.train.__getitems__(idx)
    with torch.no_grad():
        s0 = d.student(input_ids=big["input_ids"], attention_mask=big["attention_mask"]).logits
        z0 = d.teacher(input_ids=big["input_ids"], attention_mask=big["attention_mask"]).logits
    expected0 = _reference(s0, z0, big["labels"], 0.4)

    trainer = Trainer(d, data.train, _cfg(epochs=1, batch_size=3, grad_accum=4, max_steps=1))
    assert d.schedule.total_steps == trainer.total_steps == 1
    trainer.fit()
    assert d.schedule.steps.item() == 1  # 4 micro-batches, one update
    assert d.schedule.t.item() == pytest.approx(0.4)  # the first update only remembers the loss
    assert d.schedule.prev_loss.item() == pytest.approx(expected0.item(), rel=1e-5)
    row = trainer.state["history"][-1]
    assert row["train/t"] == pytest.approx(0.4)
    assert row["train/loss"] == pytest.approx(expected0.item(), rel=1e-5)  # the step's loss is the big batch's

    # 2 epochs of 8 micro-batches with grad_accum = 4: 4 optimizer steps, 4 updates; t rises (adaptive)
    d = _method(data, LMTAIDParams(alpha=0.2, beta=0.5))
    trainer = Trainer(d, data.train, _cfg(epochs=2, batch_size=3, grad_accum=4))
    trainer.fit()
    assert trainer.total_steps == 4 and d.schedule.steps.item() == 4 and d.schedule.total_steps == 4
    ts = [r["train/t"] for r in trainer.state["history"] if "train/t" in r]
    assert ts[0] == pytest.approx(0.4) and all(b >= a for a, b in zip(ts, ts[1:]))
    assert 0.4 + 0.6 * 3 / 4 - 1e-6 <= d.schedule.t.item() <= 1.0  # at least the linear bound after step 3


def test_hooks_directly_replay_is_not_recorded_and_update_uses_token_weighting():
    data = _task(8)
    d = _method(data, LMTAIDParams(total_steps=10))
    a, b = data.train.__getitems__([0, 1, 2]), data.train.__getitems__([3, 4])
    na, nb = d.count_items(a), d.count_items(b)
    assert na != nb
    for batch in (a, b):
        batch["num_items"] = torch.tensor(float(na + nb))
    la = d.training_step(a).losses["student"].detach()
    lb = d.training_step(b).losses["student"].detach()
    d.replaying = True  # SAM's second pass over the same micro-batches
    d.training_step(a)
    d.training_step(b)
    d.replaying = False
    d.on_optimizer_step()
    assert d.schedule.steps.item() == 1
    assert d.schedule.prev_loss.item() == pytest.approx((la + lb).item(), rel=1e-6)  # the token mean of a ∪ b
    # without num_items (a direct call) each loss is its own mean; the step is still the token mean
    la = d.training_step({k: v for k, v in a.items() if k != "num_items"}).losses["student"].detach()
    lb = d.training_step({k: v for k, v in b.items() if k != "num_items"}).losses["student"].detach()
    d.on_optimizer_step()
    assert d.schedule.steps.item() == 2
    assert d.schedule.prev_loss.item() == pytest.approx(((la * na + lb * nb) / (na + nb)).item(), rel=1e-6)
    d.on_optimizer_step()  # no micro-batch recorded: no update
    assert d.schedule.steps.item() == 2


def test_params_validate():
    data = {"name": "x", "task": {"name": "arithmetic", "num_train": 8},
            "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2},
            "teacher": {"model": "/nonexistent"}, "method": {"name": "lm_taid", "temperature": 2.0}}
    r = recipe_from_dict(data)
    assert r.method.params["temperature"] == 2.0 and r.method.params["t_start"] == 0.4
    with pytest.raises(RecipeError, match="t_start"):
        recipe_from_dict(data | {"method": {"name": "lm_taid", "t_start": 0.9, "t_end": 0.5}})
    with pytest.raises(RecipeError):
        recipe_from_dict(data | {"method": {"name": "lm_taid", "temperature": 0}})


def test_end_to_end_tiny_arithmetic(tmp_path):
    task = {"name": "arithmetic", "num_train": 64, "num_val": 8, "num_test": 8, "eval_size": 4}
    train = {"epochs": 1, "batch_size": 8, "lr": 0.003, "progress": False, "trackers": "none", "log_every": 1}
    teacher = {"name": "t", "seed": 0, "task": task, "method": {"name": "sft"},
               "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}, "train": train}
    data = {"name": "taid", "seed": 0, "task": task, "teacher": {"recipe": teacher},
            "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2},
            "method": {"name": "lm_taid", "alpha": 0.1}, "train": {**train, "grad_accum": 2}}
    res = run_recipe(recipe_from_dict(data), out=tmp_path / "runs")
    ts = [row["train/t"] for row in res.history if "train/t" in row]
    # the t each step used: the first update only remembers the loss, then t rises every step
    assert len(ts) == 4 and ts[0] == ts[1] == pytest.approx(0.4) and ts[1] < ts[2] < ts[3] <= 1.0
    assert all(row["train/taid"] > 0 for row in res.history if "train/taid" in row)
    assert (res.run_dir / "student" / "model.safetensors").is_file()
