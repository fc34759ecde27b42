"""Causal language models for recipes: a tiny Llama built here, or any HF ``AutoModelForCausalLM``.

Registered archs (``student: {arch: ...}``):

- ``llama``: a small randomly initialised ``LlamaForCausalLM`` sized by ``hidden``/``layers``/``heads``;
- ``hf``: any causal LM, from a local folder (``path``) or built from a config in the recipe
  (``config: {model_type: qwen2, hidden_size: 64, ...}``).

Special-token ids always come from the task's tokenizer (``docs/conventions.md``): a config class's
defaults (``LlamaConfig``: bos 1, eos 2) would make ``generate`` stop at whatever token has id 2.
Teacher and student must share the tokenizer; embedding rows past the tokenizer's length (padding
to a multiple of 64 or 128, as many hub models do) are cut by :func:`token_logits`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.core.refs import ModelFormat
from distill.core.registry import ARCHS, FORMATS, Params
from distill.errors import MismatchError, MissingFileError, RecipeError
from distill.lm.data.text import tiny_causal_lm


class LlamaParams(Params):
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate: int | None = Field(None, ge=1, description="MLP width; default 4 x hidden")
    max_positions: int = Field(512, ge=8)


def _lm(fn: Any) -> Any:
    fn.family = "lm"  # classifier tasks refuse these archs
    return fn


@ARCHS.register("llama", "small Llama causal LM (hidden, layers, heads) with the task tokenizer's special ids", LlamaParams)
@_lm
def llama(p: LlamaParams, tokenizer: Any) -> nn.Module:
    return tiny_causal_lm(None, p.hidden, p.layers, p.heads, tokenizer, intermediate=p.intermediate,
                          max_positions=p.max_positions)


class HFParams(Params):
    path: str | None = Field(None, description="a local model folder (save_pretrained layout)")
    config: dict[str, Any] | None = Field(None, description="an HF config as a mapping, with model_type")
    trust_remote_code: bool = Field(False, description="run code shipped with the model folder")

    @model_validator(mode="after")
    def _one(self) -> "HFParams":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of 'path' (a model folder) or 'config' (a mapping with model_type)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config needs 'model_type' (e.g. llama, qwen2, gpt2)")
        return self


@ARCHS.register("hf", "any HF AutoModelForCausalLM, from a local folder (path) or a config mapping (config)", HFParams)
@_lm
def hf(p: HFParams, tokenizer: Any) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if p.path is not None:
        return load_causal_lm(p.path, p.trust_remote_code)
    cfg = dict(p.config or {})
    cfg.setdefault("vocab_size", len(tokenizer))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg.setdefault(k, getattr(tokenizer, k, None))
    try:
        config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as err:
        raise RecipeError(f"student.config: {err}") from None
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=p.trust_remote_code)
    _set_generation_ids(model, tokenizer)
    return model


def _set_generation_ids(model: nn.Module, tokenizer: Any) -> None:
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(tokenizer, k, None)
            if v is not None:
                setattr(gc, k, v)


def build_lm(spec: dict[str, Any], tokenizer: Any) -> nn.Module:
    entry = ARCHS.get(spec["name"])
    if getattr(entry.obj, "family", None) != "lm":
        raise RecipeError(f"student.arch '{entry.name}' is not a language model; use 'llama' or 'hf'")
    model = entry.obj(entry.params.model_validate(spec["params"]), tokenizer)
    _set_generation_ids(model, tokenizer)
    return model


@contextmanager
def quiet_hf() -> Iterator[None]:
    """No transformers progress bars (a bar per tiny weight file is noise beside the run's own)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_causal_lm(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """An HF causal LM from a model folder, or from a run folder (its ``student/``)."""
    from transformers import AutoModelForCausalLM

    path = Path(folder).expanduser()
    if (path / "student" / "config.json").is_file():
        path = path / "student"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path} is not a model folder (no config.json)")
    try:
        with quiet_hf():
            return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MissingFileError(f"cannot load a causal LM from {path}: {str(err).splitlines()[0]}") from None


FORMATS.register("hf", "an HF causal-LM folder (config.json with model_type + model.safetensors)")(
    ModelFormat(claims=lambda cfg: "model_type" in cfg, load=load_causal_lm))


def vocab_rows(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def check_vocab(model: nn.Module, tokenizer: Any, who: str) -> None:
    """A model must have at least one output row per token (more is padding, cut before the loss)."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise MismatchError(
            f"the {who} has {rows} vocabulary rows but the tokenizer has {len(tokenizer)} tokens: "
            "it was trained with another tokenizer"
        )


def check_same_tokenizer(a: Any, b: Any, who: str = "teacher") -> None:
    """Teacher and student must tokenize identically: equal vocabularies (token -> id)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a, only_b = len(set(va) - set(vb)), len(set(vb) - set(va))
        raise MismatchError(
            f"the {who}'s tokenizer differs from the task's ({len(va)} vs {len(vb)} tokens; {only_a} and {only_b} "
            "tokens not shared, or ids differ): distillation here needs one shared tokenizer"
        )


def model_tokenizer(folder: str | Path) -> Any | None:
    """The tokenizer saved beside a model (a run's ``student/`` or a model folder), or None."""
    from transformers import AutoTokenizer

    path = Path(folder).expanduser()
    if (path / "student").is_dir():
        path = path / "student"
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(path))


def token_logits(model: nn.Module, batch: dict[str, Tensor], vocab: int) -> Tensor:
    """``[batch, seq, vocab]`` logits with padded embedding rows cut to the tokenizer's length."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[..., :vocab]


def hidden_and_head(model: nn.Module, batch: dict[str, Tensor], vocab: int) -> tuple[Tensor, Tensor]:
    """The last hidden states ``[batch, seq, hidden]`` and the lm_head weight ``[vocab, hidden]`` (cut),
    for the fused losses that never build the full logits. Models whose head adds a bias or scales or
    caps logits (e.g. Gemma's soft-capping) are refused: use the unfused loss."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None):
        raise RecipeError("method.fused: this model's head is not a plain projection; set fused: false")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state, head.weight[:vocab]


@torch.no_grad()
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
