"""What the policy-method tests share (test_lm_policy, test_lm_rlad, test_lm_grpo_loss_types): a task whose
verifier gives rewards of both kinds, tiny students, prepared micro-batches, gradients, and the reference
log-probs computed by a loop over positions (not by ``token_logprobs``)."""

from __future__ import annotations

import dataclasses

import torch

from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import IGNORE_INDEX, tiny_causal_lm


def parity_task():
    """Arithmetic with a verifier that accepts completions of even length: a random student gets rewards
    of both kinds, so advantages are not all zero."""
    data = build_arithmetic(ArithmeticParams(num_train=32, num_val=8, num_test=8, eval_size=4))
    return dataclasses.replace(data, verify=lambda text, ref: len(text) % 2 == 0)


def tiny_lm(tok, seed: int):
    return tiny_causal_lm(None, 16, 1, 2, tok, seed=seed)


def with_items(method, batches):
    """The step's token count on every micro-batch, as the trainer sets it."""
    n = torch.tensor(float(sum(method.count_items(b) for b in batches)))
    for b in batches:
        b["num_items"] = n
    return batches


def prepare(method, data, groups, seed: int = 0):
    torch.manual_seed(seed)
    return with_items(method, method.prepare_batches([data.train.__getitems__(g) for g in groups]))


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(a, b, rtol=1e-4, atol=1e-7):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def row_logprobs(model, batch, temperature: float = 1.0):
    """Per row, the log-probs of its supervised tokens at ``temperature`` from one forward pass, float64,
    by a loop over the completion positions: a list of 1-d tensors, with autograd."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    rows = []
    for r in range(logits.shape[0]):
        lp = torch.log_softmax(logits[r] / temperature, -1)
        pos = [i for i in range(logits.shape[1] - 1) if batch["labels"][r, i + 1] != IGNORE_INDEX]
        rows.append(torch.stack([lp[i, batch["labels"][r, i + 1]] for i in pos]))
    return rows
