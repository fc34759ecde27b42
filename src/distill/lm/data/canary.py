"""Planted secrets (canaries) in language-model training text, and their exposure (Carlini et al. 2019,
"The Secret Sharer"), for measuring what a model memorised of its training data (e.g. S44's claim
that privacy-aware distillation lowers the student's canary exposure).

A canary is ``"The random number is (d-d-d-d-d-d-d-d-d)"`` with nine random digits (Carlini et al.'s
"random number" format, written so that a byte-level BPE splits it the same way for every secret: its
pre-tokenizer isolates each digit and each dash, so every digit is its own single-byte token and every
candidate has the same tokens but the digits. Plain ``281265017`` or ``2 8 1 …`` would be merged
into digit chunks that differ between candidates, and ranks would compare tokenizations (an untrained
model would "prefer" the secrets that tokenize shorter). The ``pytext`` task with ``canaries: n`` inserts
each of n canaries ``canary_repeats`` times as a document among the training documents (never in
val or test, and after the BPE is trained, so the tokenizer does not memorise them).

Exposure of a canary s[r] with randomness r: its log-perplexity ``−log P(r | prefix)`` (summed over the
tokens after ``[bos] + PREFIX``, i.e. `` (d-…-d)``; the prefix's own term is common to all candidates) ranked
among the log-perplexities of the candidates R, ``exposure = log2 |R| − log2 rank`` (Carlini et al.
2019, the definitions of rank and exposure; rank 1 = most likely; ties count against the canary, as
``distill.core.metrics.exposure``). The space of nine digits (10⁹) is not enumerated: R is the
canary plus M candidates drawn uniformly from the space (one set shared by all canaries), the
estimate by sampling that Carlini et al. describe: ``log2(M + 1) − log2 rank`` estimates the full-space
exposure ``log2 10⁹ − log2 rank_full`` with ``rank_full ≈ rank · 10⁹ / (M + 1)``, and is capped at
``log2(M + 1)`` (rank 1). A model that cannot tell the candidates apart scores 0.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor, nn

from distill.lm.losses import sequence_logprob
from distill.lm.models import token_logits
from distill.lm.data.text import Example, collate, encode_pair
from distill.core.metrics import exposure

PREFIX = "The random number is"
DIGITS = 9


def secret_text(digits: str) -> str:
    """The canary sentence for a digit string: ``PREFIX (d-d-…-d)``."""
    return f"{PREFIX} ({'-'.join(digits)})"


def draw_secrets(n: int, rng: random.Random, exclude: set[str] | None = None) -> list[str]:
    """``n`` distinct random ``DIGITS``-digit strings (leading zeros allowed), none in ``exclude``."""
    seen, out = set(exclude or ()), []
    while len(out) < n:
        s = "".join(rng.choice("0123456789") for _ in range(DIGITS))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_canaries(num_canaries: int, num_candidates: int, seed: int) -> tuple[list[str], list[str]]:
    """The canaries' secrets and the M candidates (distinct from them and from each other), drawn
    from one ``random.Random(seed)``."""
    rng = random.Random(seed)
    secrets = draw_secrets(num_canaries, rng)
    return secrets, draw_secrets(num_candidates, rng, set(secrets))


def encode_secrets(tokenizer: Any, secrets: list[str]) -> list[Example]:
    """``[bos] + prefix + secret`` per secret, only the secret's tokens supervised; the prefix must
    tokenize the same alone and in the sentence (true for byte-level BPE, which splits at spaces)."""
    prefix = tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
    out = []
    for s in secrets:
        ids = tokenizer(secret_text(s), add_special_tokens=False)["input_ids"]
        if ids[: len(prefix)] != prefix:
            raise ValueError(f"the tokenizer splits {PREFIX!r} differently inside the canary sentence; canaries "
                             "need a tokenizer that splits at spaces")
        out.append(encode_pair(prefix, ids[len(prefix):], tokenizer.bos_token_id, None))
    return out


@torch.no_grad()
def secret_nll(model: nn.Module, tokenizer: Any, secrets: list[str], vocab: int, batch_size: int = 256) -> Tensor:
    """``[len(secrets)]`` log-perplexities (nats): ``−Σ log P(token)`` over each secret's tokens given
    ``[bos] + PREFIX``, in float32 on the CPU."""
    examples = encode_secrets(tokenizer, secrets)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out.append(-sequence_logprob(token_logits(model, batch, vocab), batch["labels"]).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def lm_canary_exposure(model: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Mean exposure (bits) of the canaries planted in ``data`` (``meta["canaries"]``, scored against
    ``meta["canary_candidates"]``); in [0, log2(M + 1)]."""
    if not data.meta.get("canaries"):
        raise ValueError("the task has no planted canaries; use task 'pytext' with canaries > 0")
    secrets, candidates = data.meta["canaries"], data.meta["canary_candidates"]
    nll = secret_nll(model, data.tokenizer, list(secrets) + list(candidates), data.vocab, batch_size)
    own, cand = nll[: len(secrets)], nll[len(secrets):]
    table = torch.cat([own[:, None], cand.expand(len(secrets), -1)], dim=1)  # column 0: the canary
    return exposure(table, torch.zeros(len(secrets), dtype=torch.long)).mean().item()


def max_exposure(num_candidates: int) -> float:
    """The largest exposure the sampled estimate can show: ``log2(M + 1)``."""
    return math.log2(num_candidates + 1)
