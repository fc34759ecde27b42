"""Rollouts: sample (or greedily decode) completions from a causal LM, with their log-probs.

One interface, :func:`rollout`, for every backend:

- ``hf`` (default): batched ``model.generate`` with the KV cache, left-padded prompts;
- ``vllm``: the same request on a vLLM engine (GPU users; ``pip install 'distill[vllm]'``), imported
  only when chosen. vLLM loads the model from a folder, so pass the folder (``model_path``).

The log-prob of each sampled token is taken under the model's distribution at ``temperature``
(logits / T, full vocabulary, before any top-k/top-p truncation), which is what on-policy objectives
score. A completion ends at (and includes) the first ``eos``; later tokens are dropped.
"""

from __future__ import annotations

import contextlib

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.errors import RecipeError
from distill.lm.data.text import IGNORE_INDEX, Example, collate

Backend = Literal["hf", "vllm"]


@dataclass
class Rollouts:
    """``prompts[i]`` (token ids, as given) and ``completions[i]`` (generated ids, up to and including
    ``eos`` when it was produced), ``logprobs[i]`` (one float per completion token) and whether the
    completion ended with ``eos`` (``finished``)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")

    def texts(self, tokenizer: Any) -> list[str]:
        return [tokenizer.decode(c, skip_special_tokens=True) for c in self.completions]

    def examples(self) -> list[Example]:
        """Prompt + completion with only the completion supervised (the prompt as given, e.g. with bos)."""
        return completion_examples(self.prompts, self.completions)

    def batch(self, pad_id: int) -> dict[str, Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` for training on the completions."""
        return collate(self.examples(), pad_id)


def completion_examples(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[Example]:
    """``prompt + completion`` per pair, only the completion supervised."""
    return [Example(list(p) + list(c), [IGNORE_INDEX] * len(p) + list(c)) for p, c in zip(prompts, completions)]


def rollout(
    model: nn.Module | str,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 64,
    backend: Backend = "hf",
) -> Rollouts:
    """Completions for ``prompts`` (each repeated ``num_samples`` times, consecutively).

    ``model`` is an ``nn.Module`` for ``hf`` and a model folder for ``vllm``. ``greedy`` decodes the
    argmax (log-probs still at ``temperature``). Sampling uses the global torch RNG (seeded by the run).
    """
    if temperature <= 0:
        raise RecipeError("rollout temperature must be > 0 (use greedy=True for argmax decoding)")
    prompts = [list(p) for p in prompts for _ in range(num_samples)]
    start = time.perf_counter()
    if backend == "hf":
        if not isinstance(model, nn.Module):
            raise RecipeError("the hf rollout backend needs a model, not a path")
        out = _hf(model, prompts, max_new_tokens, eos_id, pad_id, temperature, greedy, top_p, batch_size)
    elif backend == "vllm":
        out = _vllm(model, prompts, max_new_tokens, eos_id, temperature, greedy, top_p)
    else:
        raise RecipeError(f"unknown rollout backend '{backend}'; use 'hf' or 'vllm'")
    completions, logprobs, finished = out
    return Rollouts(prompts, completions, logprobs, finished, time.perf_counter() - start, {"backend": backend})


def _trim(ids: list[int], lps: list[float], eos_id: int) -> tuple[list[int], list[float], bool]:
    if eos_id in ids:
        k = ids.index(eos_id) + 1
        return ids[:k], lps[:k], True
    return ids, lps, False


@contextlib.contextmanager
def own_generation_config(model: nn.Module, eos_id: int, pad_id: int) -> Iterator[None]:
    """Generate with a generation config of our own only: hub models ship sampling fields in
    ``generation_config.json`` (``repetition_penalty``, ``min_p``, ``top_k: 20``, ``temperature: 0.6``)
    that transformers would otherwise merge into every ``generate`` call, so samples would not come from
    π at the stated temperature while their logged log-probs do (``docs/conventions.md``). The model's
    own config is put back afterwards."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id,
                                               bos_token_id=getattr(saved, "bos_token_id", None))
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def _hf(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
        temperature: float, greedy: bool, top_p: float, batch_size: int):
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions, logprobs, finished = [], [], []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = collate([Example(p, [IGNORE_INDEX] * len(p)) for p in chunk], pad_id, padding_side="left")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            with own_generation_config(model, eos_id, pad_id):
                gen = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
                    temperature=None if greedy else temperature, top_k=None if greedy else 0,
                    top_p=None if greedy or top_p >= 1 else top_p, eos_token_id=eos_id, pad_token_id=pad_id,
                    return_dict_in_generate=True, output_logits=True,
                )
            new = gen.sequences[:, ids.shape[1]:]
            steps = torch.stack(gen.logits, dim=1).float()[:, : new.shape[1]]  # raw logits per new token
            lp = torch.log_softmax(steps / temperature, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row, row_lp in zip(new.tolist(), lp.tolist()):
                c, l, f = _trim(row, row_lp, eos_id)
                completions.append(c)
                logprobs.append(l)
                finished.append(f)
    finally:
        model.train(was_training)
    return completions, logprobs, finished


def _vllm(model: Any, prompts: list[list[int]], max_new_tokens: int, eos_id: int, temperature: float,
          greedy: bool, top_p: float):  # pragma: no cover - needs a GPU and vllm
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise RecipeError("the vllm rollout backend needs vllm: pip install 'distill[vllm]' (GPU only)") from None
    if not isinstance(model, str):
        raise RecipeError("the vllm rollout backend loads the model itself: pass its folder, not a module")
    llm = LLM(model=model, skip_tokenizer_init=True)
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_p=top_p, logprobs=0,
        stop_token_ids=[eos_id],
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    completions, logprobs, finished = [], [], []
    for o in outs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        lps = [d[t].logprob for d, t in zip(c.logprobs, ids)]
        ci, li, f = _trim(ids, lps, eos_id)
        completions.append(ci)
        logprobs.append(li)
        finished.append(f)
    return completions, logprobs, finished
