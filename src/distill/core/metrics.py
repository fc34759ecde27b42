"""Classifier metrics: accuracy, NLL, ECE and fidelity to the teacher (S42).

Pure functions over logits ``[n, classes]`` and labels ``[n]``; ``evaluate_classifier`` runs a
model over a dataset and returns flat keys without a split prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.functional import kl_rows


# calibration temperatures searched by FIRST (S03; logits/methods/first.py and lm/methods/lm_first.py): it divides
# probabilities in [0, 1]: 1e-3 makes the target one-hot on the top-1 class, 1e2 makes it uniform over
# the top k; a log grid covers both ends
CALIBRATION_GRID = torch.logspace(-3, 2, 251)


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def nll(logits: Tensor, y: Tensor) -> float:
    return F.cross_entropy(logits.float(), y).item()


def ece(logits: Tensor, y: Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (Guo et al. 2017)."""
    conf, pred = F.softmax(logits.float(), dim=-1).max(-1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            total += inb.float().mean() * (conf[inb].mean() - correct[inb].mean()).abs()
    return total.item()


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Top-1 agreement between student and teacher (S42's fidelity)."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Mean KL(teacher ‖ student) at temperature 1."""
    return kl_rows(F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)).mean().item()


def exposure(candidate_losses: Tensor, secret: Tensor) -> Tensor:
    """Canary exposure (Carlini et al. 2019, "The Secret Sharer"), shared by the classifier and LM canary tasks.
    Per-canary exposure ``[n]`` from candidate losses ``[n, candidates]`` and the secret's
    column ``[n]``. Ties count against the secret (rank = #candidates with loss ≤ the secret's),
    so a model that cannot tell the candidates apart shows exposure 0, not the maximum."""
    own = candidate_losses.gather(-1, secret.long()[:, None])
    rank = (candidate_losses <= own).sum(-1)
    return math.log2(candidate_losses.shape[-1]) - rank.float().log2()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def classifier_metrics(logits: Tensor, y: Tensor, teacher_logits: Tensor | None = None) -> dict[str, float]:
    m = {"accuracy": accuracy(logits, y), "nll": nll(logits, y), "ece": ece(logits, y)}
    if teacher_logits is not None:
        m["agreement"] = agreement(logits, teacher_logits)
        m["kl_to_teacher"] = kl_to_teacher(logits, teacher_logits)
    return m
