"""Canaries planted in ``pytext`` (Carlini et al. 2019): they are in the training text only, every
candidate tokenizes alike, exposure matches a direct computation on a model that memorised some
canaries and is 0 on one that cannot tell candidates apart, and runs report it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.lm.data.canary import PREFIX, encode_secrets, lm_canary_exposure, make_canaries, secret_text
from distill.lm.data.tasks import PyTextParams, build_pytext_task
from distill.lm.data.text import tiny_causal_lm

N_CANARIES, REPEATS, M = 3, 5, 63


@pytest.fixture(scope="module")
def data():
    return build_pytext_task(PyTextParams(vocab_size=512, canaries=N_CANARIES, canary_repeats=REPEATS,
                                          canary_candidates=M, canary_seed=7))


@pytest.fixture(scope="module")
def plain():
    return build_pytext_task(PyTextParams(vocab_size=512))


def _count(stream: list[int], sub: list[int]) -> int:
    n = len(sub)
    return sum(1 for i in range(len(stream) - n + 1) if stream[i : i + n] == sub)


def test_canaries_are_in_train_only_and_whole(data, plain):
    tok = data.tokenizer
    secrets, candidates = data.meta["canaries"], data.meta["canary_candidates"]
    assert (secrets, candidates) == make_canaries(N_CANARIES, M, 7)
    assert len(set(secrets)) == N_CANARIES and len(set(candidates)) == M and not set(secrets) & set(candidates)
    assert all(len(s) == 9 and s.isdigit() for s in secrets + candidates)
    streams = {k: [t for e in getattr(data, k).examples for t in e.input_ids] for k in ("train", "val", "test")}
    for s in secrets:
        # the canary document exactly as packed: [bos] sentence [eos]
        doc = [tok.bos_token_id] + tok(secret_text(s), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert _count(streams["train"], doc) == REPEATS
        assert _count(streams["val"], doc) == 0 and _count(streams["test"], doc) == 0
    # the tokenizer is trained without them, val and test are untouched, train only grows
    assert data.tokenizer.get_vocab() == plain.tokenizer.get_vocab()
    for k in ("val", "test"):
        assert [e.input_ids for e in getattr(data, k).examples] == [e.input_ids for e in getattr(plain, k).examples]
    assert len(data.train) > len(plain.train) and data.fingerprint != plain.fingerprint
    assert plain.extra_metrics is None and data.extra_metrics is not None


def test_canaries_off_leaves_the_params_dump_and_fingerprint_unchanged(plain):
    p = PyTextParams(vocab_size=512)
    assert p.model_dump() == {"block_size": 128, "vocab_size": 512, "split_seed": 0}
    assert "canary_seed" in PyTextParams(canaries=1).model_dump()
    # the data fingerprint of a canary-free task is the one written before canaries existed
    from distill.lm.data.tasks import _fingerprint
    from distill.lm.data.task import tokenizer_fingerprint
    from distill.lm.data.pytext import corpus_fingerprint

    expected = _fingerprint("pytext", {"block_size": 128, "vocab_size": 512, "split_seed": 0}, corpus_fingerprint(),
                            tokenizer_fingerprint(plain.tokenizer))
    assert plain.fingerprint == expected


def test_every_candidate_tokenizes_to_the_prefix_then_one_token_per_digit(data):
    examples = encode_secrets(data.tokenizer, data.meta["canaries"] + data.meta["canary_candidates"])
    prefix = data.tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
    assert len({len(e.input_ids) for e in examples}) == 1
    for e, s in zip(examples, data.meta["canaries"] + data.meta["canary_candidates"]):
        assert e.input_ids[: 1 + len(prefix)] == [data.tokenizer.bos_token_id] + prefix
        assert all(label == -100 for label in e.labels[: 1 + len(prefix)])
        digits = [data.tokenizer.convert_ids_to_tokens(i) for i in e.input_ids[1 + len(prefix):]]
        assert [d for d in digits if d.isdigit()] == list(s)  # each digit its own token


class Memoriser(nn.Module):
    """A 'language model' that memorised token sequences: wherever the input so far is a prefix of one
    of ``seqs``, the logit of that sequence's next token is ``boost``; every other logit is 0."""

    def __init__(self, vocab: int, seqs: list[list[int]], boost: float = 8.0) -> None:
        super().__init__()
        self.vocab, self.seqs, self.boost = vocab, seqs, boost
        self.anchor = nn.Parameter(torch.zeros(()))  # a device for the metric's code

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for row in range(b):
            ids = input_ids[row].tolist()
            for seq in self.seqs:
                for i in range(min(t, len(seq) - 1)):
                    if ids[: i + 1] != seq[: i + 1]:
                        break
                    logits[row, i, seq[i + 1]] += self.boost
        return SimpleNamespace(logits=logits)


def _direct_nll(seqs: list[list[int]], vocab: int, boost: float, full: list[int], start: int) -> float:
    """−Σ log p(full[j]) for j ≥ start under ``Memoriser``'s rule, from the logits written out."""
    total = 0.0
    for j in range(start, len(full)):
        logit: dict[int, float] = {}
        for seq in seqs:
            if len(seq) > j and seq[:j] == full[:j]:
                logit[seq[j]] = logit.get(seq[j], 0.0) + boost
        z = (vocab - len(logit)) + sum(math.exp(v) for v in logit.values())
        total += math.log(z) - logit.get(full[j], 0.0)
    return total


def _direct_exposures(data, memorised: list[str]) -> list[float]:
    """Per canary: log2(M + 1) − log2(rank) among the candidates, from ``_direct_nll``."""
    tok, vocab = data.tokenizer, data.vocab
    secrets, candidates = data.meta["canaries"], data.meta["canary_candidates"]
    full = {s: e.input_ids for s, e in zip(secrets + candidates, encode_secrets(tok, secrets + candidates))}
    start = 1 + len(tok(PREFIX, add_special_tokens=False)["input_ids"])  # the first scored token
    seqs = [full[s] for s in memorised]
    nll = {s: _direct_nll(seqs, vocab, 8.0, full[s], start) for s in secrets + candidates}
    out = []
    for s in secrets:
        rank = 1 + sum(nll[c] <= nll[s] for c in candidates)  # ties count against the canary
        out.append(math.log2(M + 1) - math.log2(rank))
    return out


def _memoriser(data, memorised: list[str]) -> Memoriser:
    examples = encode_secrets(data.tokenizer, memorised)
    return Memoriser(data.vocab, [e.input_ids for e in examples])


def test_exposure_matches_a_direct_computation(data):
    secrets, candidates = data.meta["canaries"], data.meta["canary_candidates"]
    # two canaries memorised, canary 2 not
    direct = _direct_exposures(data, secrets[:2])
    assert direct[0] == direct[1] == pytest.approx(math.log2(M + 1))  # memorised: rank 1, the maximum
    assert direct[2] < 2.0
    got = lm_canary_exposure(_memoriser(data, secrets[:2]), data, batch_size=7)
    assert got == pytest.approx(sum(direct) / N_CANARIES, rel=1e-6)
    # a model that memorised nothing gives every (equally long) candidate the same loss: exposure 0
    assert _direct_exposures(data, []) == [0.0] * N_CANARIES
    assert lm_canary_exposure(_memoriser(data, []), data) == 0.0
    # a model that memorised a candidate instead: the canaries rank below it
    direct = _direct_exposures(data, candidates[:1])
    assert max(direct) < math.log2(M + 1) - 0.5
    assert lm_canary_exposure(_memoriser(data, candidates[:1]), data) == pytest.approx(sum(direct) / N_CANARIES,
                                                                                       rel=1e-6)


def test_runs_report_canary_exposure_for_student_and_teacher(data):
    student = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)
    teacher = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=1)
    metrics = data.final_metrics(student, teacher)
    assert metrics["test/canary_exposure"] == pytest.approx(lm_canary_exposure(student, data))
    assert metrics["teacher/canary_exposure"] == pytest.approx(lm_canary_exposure(teacher, data))
    assert 0.0 <= metrics["test/canary_exposure"] <= math.log2(M + 1)


def test_no_canaries_is_an_error_for_the_metric(plain):
    with pytest.raises(ValueError, match="canaries"):
        lm_canary_exposure(tiny_causal_lm(None, 16, 1, 2, plain.tokenizer, seed=0), plain)
