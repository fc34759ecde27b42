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

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from safetensors import SafetensorError
from torch import Tensor, nn

from distill.core import weights as weights_check
from distill.core.refs import ModelFormat
from distill.core.registry import ARCHS, FORMATS, Params, PathField
from distill.errors import MismatchError, MissingFileError, RecipeError, WeightsError
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
    path: str | None = PathField(None, description="a local model folder (save_pretrained layout)")
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
        own = model_tokenizer(p.path)
        if own is not None:  # a student saved with another tokenizer must not be trained (and saved) with ours
            check_same_tokenizer(own, tokenizer, f"student in {p.path}")
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


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF model folder (one file, or the shards its index names)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = [path / s for s in shards]
        if any(Path(s).name != s for s in shards):
            raise WeightsError(f"{index}: shard names must be files of {path}")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: shard {missing[0]} does not exist")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise WeightsError(f"{path} has only pickled weights (.bin/.pt): convert them to model.safetensors "
                           "(model.save_pretrained(folder, safe_serialization=True)); pickles are not loaded")
    raise MissingFileError(f"{path} has no model.safetensors")


def _expected_keys(meta: nn.Module, files: list[Path]) -> tuple[dict[str, tuple[int, ...]], list[str], list[str]]:
    """What the files must hold for ``meta`` (an HF model on the meta device): key -> shape, the keys that
    may be missing (tied output embedding, the class's own ignore lists) and that may be extra."""
    expected = weights_check.shapes(meta)
    ignore_missing = list(getattr(meta, "_keys_to_ignore_on_load_missing", None) or [])
    ignore_unexpected = list(getattr(meta, "_keys_to_ignore_on_load_unexpected", None) or [])
    out, inp = meta.get_output_embeddings(), meta.get_input_embeddings()
    tied = getattr(getattr(meta, "config", None), "tie_word_embeddings", False)
    if out is not None and inp is not None and (out.weight is inp.weight or tied):  # tied: saved once
        head = next(n for n, m in meta.named_modules() if m is out)
        ignore_missing.append(f"^{re.escape(head)}\\.weight$")
    prefix = f"{getattr(meta, 'base_model_prefix', '')}."
    names = set().union(*(weights_check.header(f) for f in files))
    if prefix != "." and not any(k.startswith(prefix) for k in names):  # a base model's file (no head prefix)
        expected = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in expected.items()}
    return expected, ignore_missing, ignore_unexpected


def read_hf_config(path: Path, hint: str = "") -> dict:
    """``path/config.json`` of an HF model folder, with one-line errors: no file, not JSON, no ``model_type``
    (``hint`` says what the folder may be instead)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MissingFileError(f"{path} is not a model folder (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError:
        raise WeightsError(f"{cfg_file}: not valid JSON") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise WeightsError(f"{cfg_file} has no model_type: not an HF model folder{hint}")
    return raw


def load_causal_lm(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """An HF causal LM from a model folder, or from a run folder (its ``student/``).

    Strict: the model is built on the meta device from ``config.json`` and compared with the
    safetensors headers (keys and shapes, ``core/weights.py``) before anything is materialised; a
    config of another kind, a partial or empty file, or pickled weights are one-line errors."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder).expanduser()
    if (path / "student" / "config.json").is_file():
        path = path / "student"
    read_hf_config(path, " (a classifier run's student?)")  # the one-line errors before transformers'
    try:
        with quiet_hf():
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            with init_empty_weights():
                meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise WeightsError(f"{path / 'config.json'}: not a causal-LM config ({str(err).splitlines()[0]})") from None
    files = _weight_files(path)
    expected, ignore_missing, ignore_unexpected = _expected_keys(meta, files)
    weights_check.check(expected, files, ignore_missing, ignore_unexpected)
    del meta
    try:
        with quiet_hf():
            return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as err:
        raise WeightsError(f"cannot load a causal LM from {path}: {str(err).splitlines()[0]}") from None


FORMATS.register("hf", "an HF causal-LM folder (config.json with model_type + model.safetensors)")(
    ModelFormat(claims=lambda cfg: "model_type" in cfg and "distill_format" not in cfg, load=load_causal_lm))


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


def tokenization(tok: Any) -> dict[str, Any]:
    """What decides how text becomes ids: the vocabulary and special ids and, for fast tokenizers, the
    model (merges), normalizer and pre-tokenizer (two BPEs with one vocabulary but other merges differ)."""
    out: dict[str, Any] = {"vocab": sorted(tok.get_vocab().items()),
                           "specials": [getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        out.update({k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")})
    return out


def check_same_tokenizer(a: Any, b: Any, who: str = "teacher") -> None:
    """Teacher, student and task must tokenize identically: equal vocabularies (token -> id), merges,
    normalizer and pre-tokenizer."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a, only_b = len(set(va) - set(vb)), len(set(vb) - set(va))
        raise MismatchError(
            f"the {who}'s tokenizer differs from the task's ({len(va)} vs {len(vb)} tokens; {only_a} and {only_b} "
            "tokens not shared, or ids differ): distillation here needs one shared tokenizer"
        )
    ta, tb = tokenization(a), tokenization(b)
    if ta != tb:
        parts = [k for k in ta if ta[k] != tb.get(k)]
        raise MismatchError(f"the {who}'s tokenizer has the task's vocabulary but another {', '.join(parts)}: it splits "
                            "text differently; distillation here needs one shared tokenizer")


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in ``folder``, as its files define it. With a ``tokenizer.json`` it is loaded as
    that file says (``PreTrainedTokenizerFast``), not re-built by the class ``AutoTokenizer`` maps the
    folder's model type to (a Qwen2 folder would turn a BPE of one's own into Qwen2's splitting rules)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(folder).expanduser()
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def model_tokenizer(folder: str | Path) -> Any | None:
    """The tokenizer saved beside a model (a run's ``student/`` or a model folder), or None."""
    path = Path(folder).expanduser()
    if (path / "student").is_dir():
        path = path / "student"
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return load_tokenizer(path)


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


def context_length(model: nn.Module) -> int | None:
    """The positions a causal LM can attend over (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_context(model: nn.Module, who: str, need: int, what: str, fix: str) -> None:
    """A ``MismatchError`` naming the setting to change when ``need`` tokens exceed the model's context."""
    ctx = context_length(model)
    if ctx is not None and need > ctx:
        raise MismatchError(f"the {who} has {ctx} positions but {what} needs {need}: {fix}")


@torch.no_grad()
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
