"""Language-model metrics: perplexity, token KL to the teacher, exact match of greedy completions.

- ``perplexity`` = exp(mean NLL over the split's supervised tokens); ``nll`` is that mean.
- ``token_kl`` = mean over the same tokens of KL(p_teacher ‖ p_model) at temperature 1 (the forward
  KL of ``distill.lm.losses``), i.e. how far the model's next-token distributions are from the teacher's.
- ``exact_match`` = the fraction of prompts whose greedy completion the task's verifier accepts;
  ``gen_tokens_per_s`` the generation throughput of that pass (batched ``generate`` with KV cache).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from distill.lm.losses import token_divergence
from distill.lm.models import token_logits
from distill.lm.rollout import rollout


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_metrics(model: nn.Module, split: Any, teacher: nn.Module | None, vocab: int,
                  batch_size: int = 64) -> dict[str, float]:
    was = model.training
    model.eval()
    nll = kl = 0.0
    n = 0
    try:
        for batch in split.batches(batch_size):
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            logits = token_logits(model, batch, vocab).float()
            target = batch["labels"][:, 1:]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, vocab), target.reshape(-1), ignore_index=-100,
                                   reduction="sum").item()
            count = int((target != -100).sum())
            n += count
            if teacher is not None and count:
                t = token_logits(teacher, {k: v.to(_device(teacher)) for k, v in batch.items()}, vocab).float()
                kl += token_divergence(logits, t.to(logits.device), batch["labels"], "forward_kl", num_items=1).item()
    finally:
        model.train(was)
    out = {"nll": nll / max(n, 1), "perplexity": math.exp(min(nll / max(n, 1), 50.0))}
    if teacher is not None:
        out["token_kl"] = kl / max(n, 1)
    return out


def exact_match(model: nn.Module, split: Any, verify: Callable[[str, Any], bool], tokenizer: Any,
                max_new_tokens: int, batch_size: int = 64, limit: int | None = None) -> dict[str, float]:
    n = len(split) if limit is None else min(limit, len(split))
    r = rollout(model, split.prompts[:n], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id, greedy=True, batch_size=batch_size)
    texts = r.texts(tokenizer)
    correct = sum(bool(verify(t, ref)) for t, ref in zip(texts, split.references[:n]))
    return {"exact_match": correct / max(n, 1), "gen_tokens_per_s": r.tokens_per_s}
