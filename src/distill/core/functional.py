"""Small numerical helpers shared by losses and metrics (core sits below the method families)."""

from __future__ import annotations

from torch import Tensor


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row from log-probabilities, summed over the last dimension ``[..., C] -> [...]``.

    Terms with p = 0 contribute exactly 0 (no 0·log 0 NaNs).
    """
    p = log_p.exp()
    off = p == 0  # fill both logs there, so no -inf reaches the product or its gradient
    return (p * (log_p.masked_fill(off, 0.0) - log_q.masked_fill(off, 0.0))).sum(-1)
