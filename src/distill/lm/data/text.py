"""Shared data plumbing for causal-LM tasks: encoding, collation, block packing, JSONL, a tiny model.

Conventions (``docs/conventions.md``, "Language-model token losses"):

- ``labels`` are input-aligned, exactly as passed to an HF model: ``labels[i]`` is ``input_ids[i]`` where
  position ``i`` is supervised and ``-100`` elsewhere (prompt, padding). The loss applies the causal
  shift itself, so the completion's first token is predicted from the prompt's last position.
- A sequence is ``[bos] + prompt + completion + [eos]`` (``bos``/``eos`` only where the tokenizer has
  them); the completion's tokens and the ``eos`` are supervised, nothing else.
- Special-token ids always come from the tokenizer, never from a config class's defaults
  (``LlamaConfig`` defaults to ``bos=1, eos=2``): see :func:`tiny_causal_lm`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from distill.errors import MissingFileError, RecipeError

IGNORE_INDEX = -100


class SpecialIds(Protocol):
    """Anything with the three special-token ids (an HF tokenizer or one of ours)."""

    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None


@dataclass(frozen=True)
class Example:
    """One encoded sequence: ``input_ids`` and input-aligned ``labels`` (``-100`` = not supervised)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels differ in length")


def encode_pair(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    bos_id: int | None,
    eos_id: int | None,
    max_length: int | None = None,
) -> Example:
    """``[bos] + prompt + completion + [eos]`` with only the completion and ``eos`` supervised.

    ``max_length`` cuts the sequence from the end (the prompt is kept; a cut completion loses its
    ``eos``). A prompt that alone fills ``max_length`` leaves nothing to supervise: an error.
    """
    head = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
    tail = list(completion_ids) + ([eos_id] if eos_id is not None else [])
    ids = head + tail
    labels = [IGNORE_INDEX] * len(head) + tail
    if max_length is not None and len(ids) > max_length:
        if len(head) >= max_length:
            raise RecipeError(
                f"a prompt of {len(head)} tokens leaves no room for the completion in max_length={max_length}"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels)


def encode_text(
    text_ids: Sequence[int], bos_id: int | None, eos_id: int | None, max_length: int | None = None
) -> Example:
    """``[bos] + text + [eos]``, every token after ``bos`` supervised (``bos`` itself is never predicted)."""
    head = [bos_id] if bos_id is not None else []
    tail = list(text_ids) + ([eos_id] if eos_id is not None else [])
    ids, labels = head + tail, [IGNORE_INDEX] * len(head) + tail
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels)


def collate(
    examples: Sequence[Example], pad_id: int, padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad to the longest example: ``input_ids`` (pad = ``pad_id``), ``attention_mask``, ``labels`` (pad = -100).

    Right padding for training; left padding for batched ``generate`` on prompts.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    n = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        k = len(e.input_ids)
        sl = slice(0, k) if padding_side == "right" else slice(n - k, n)
        ids[row, sl] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, sl] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Collator:
    """``DataLoader`` ``collate_fn``: :func:`collate` with a fixed pad id and side."""

    def __init__(self, pad_id: int, padding_side: Literal["right", "left"] = "right") -> None:
        self.pad_id, self.padding_side = pad_id, padding_side

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id, self.padding_side)


def pack_blocks(
    token_docs: Sequence[Sequence[int]], block_size: int, bos_id: int | None = None, eos_id: int | None = None,
    drop_last: bool = True,
) -> dict[str, torch.Tensor]:
    """Concatenate documents (each as ``[bos] + doc + [eos]``) and cut into ``[N, block_size]`` blocks.

    Every token is supervised (``labels`` = ``input_ids``; the loss shifts), the mask is all ones and
    attention crosses document boundaries (standard packing; ``eos`` marks them). The remainder
    shorter than a block is dropped unless ``drop_last=False``, which pads it (pad = ``eos_id``,
    label -100, mask 0).
    """
    if block_size < 2:
        raise ValueError("block_size must be at least 2")
    stream: list[int] = []
    for doc in token_docs:
        stream += ([bos_id] if bos_id is not None else []) + list(doc) + ([eos_id] if eos_id is not None else [])
    n_full = len(stream) // block_size
    ids = torch.tensor(stream[: n_full * block_size], dtype=torch.long).view(n_full, block_size)
    labels, mask = ids.clone(), torch.ones_like(ids)
    rest = stream[n_full * block_size:]
    if rest and not drop_last:
        pad = eos_id if eos_id is not None else 0
        r = torch.full((1, block_size), pad, dtype=torch.long)
        r[0, : len(rest)] = torch.tensor(rest)
        rl = torch.full((1, block_size), IGNORE_INDEX, dtype=torch.long)
        rl[0, : len(rest)] = torch.tensor(rest)
        rm = torch.zeros((1, block_size), dtype=torch.long)
        rm[0, : len(rest)] = 1
        ids, labels, mask = torch.cat([ids, r]), torch.cat([labels, rl]), torch.cat([mask, rm])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------- JSONL


@dataclass(frozen=True)
class TextRecord:
    """A JSONL record: either ``prompt`` + ``completion`` (``text`` None) or ``text`` alone."""

    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    @property
    def kind(self) -> Literal["prompt_completion", "text"]:
        return "text" if self.text is not None else "prompt_completion"


def load_jsonl(path: str | Path) -> list[TextRecord]:
    """Read a user's JSONL file: one JSON object a line, with string fields ``prompt`` and ``completion``,
    or ``text``. Blank lines are skipped; other keys are ignored. All records must be of one kind.

    Raises :class:`MissingFileError` for a missing file and :class:`RecipeError` naming the file and
    line for invalid JSON, a non-object, missing or non-string fields, or a mix of kinds.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"data file {p} does not exist")
    records: list[TextRecord] = []
    first_kind: tuple[str, int] | None = None
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise RecipeError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
            if "prompt" in obj or "completion" in obj:
                missing = [k for k in ("prompt", "completion") if k not in obj]
                if missing:
                    raise RecipeError(f"{where}: record has no '{missing[0]}' field (needs 'prompt' and 'completion')")
                rec = TextRecord(prompt=obj["prompt"], completion=obj["completion"])
                fields = ("prompt", "completion")
            elif "text" in obj:
                rec, fields = TextRecord(text=obj["text"]), ("text",)
            else:
                keys = ", ".join(sorted(obj)) or "none"
                raise RecipeError(f"{where}: record needs 'prompt' and 'completion', or 'text' (has: {keys})")
            for k in fields:
                if not isinstance(obj[k], str):
                    raise RecipeError(f"{where}: field '{k}' must be a string, got {type(obj[k]).__name__}")
            if first_kind is None:
                first_kind = (rec.kind, lineno)
            elif rec.kind != first_kind[0]:
                raise RecipeError(
                    f"{where}: a '{rec.kind}' record in a file whose line {first_kind[1]} is '{first_kind[0]}'; "
                    "use one kind per file"
                )
            records.append(rec)
    if not records:
        raise RecipeError(f"{p}: no records")
    return records


def load_records(path: str | Path) -> list[TextRecord]:
    """A JSONL file (:func:`load_jsonl`) or a folder written by HF ``datasets``' ``save_to_disk`` (a
    ``Dataset`` with ``prompt`` and ``completion`` or ``text`` columns; a ``DatasetDict`` needs its
    split's subfolder). The folder form needs ``pip install datasets``."""
    p = Path(path)
    if not p.is_dir():
        return load_jsonl(p)
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise RecipeError(f"{p} is a folder: reading a saved HF dataset needs `pip install datasets`") from None
    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(f"{p}: not a dataset saved with save_to_disk ({str(err).splitlines()[0]})") from None
    if not isinstance(ds, Dataset):
        raise RecipeError(f"{p} holds several splits ({', '.join(ds)}); give the split's folder, e.g. {p / next(iter(ds))}")
    cols = set(ds.column_names)
    if {"prompt", "completion"} <= cols:
        records = [TextRecord(prompt=r["prompt"], completion=r["completion"]) for r in ds]
    elif "text" in cols:
        records = [TextRecord(text=r["text"]) for r in ds]
    else:
        raise RecipeError(f"{p}: needs columns 'prompt' and 'completion', or 'text' (has: {', '.join(sorted(cols))})")
    bad = next((r for r in records for v in (r.prompt, r.completion, r.text) if v is not None and not isinstance(v, str)), None)
    if bad is not None or not records:
        raise RecipeError(f"{p}: every field must be a string and the dataset non-empty")
    return records


def encode_records(records: Sequence[TextRecord], tokenizer: Any, max_length: int | None = None) -> list[Example]:
    """Encode records with an HF tokenizer: prompt and completion are tokenized separately (so the
    boundary is exact) without the tokenizer's own special tokens; ``bos``/``eos`` are added here
    where the tokenizer defines them."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    out = []
    for r in records:
        if r.text is not None:
            out.append(encode_text(enc(r.text), bos, eos, max_length))
        else:
            out.append(encode_pair(enc(r.prompt or ""), enc(r.completion or ""), bos, eos, max_length))
    return out


# ------------------------------------------------------------------------------------------ tiny model


def tiny_causal_lm(
    vocab_size: int | None,
    hidden: int,
    layers: int,
    heads: int,
    tokenizer: SpecialIds,
    *,
    intermediate: int | None = None,
    max_positions: int = 512,
    seed: int | None = None,
) -> Any:
    """A small randomly initialised ``LlamaForCausalLM`` whose bos/eos/pad ids are the tokenizer's.

    ``vocab_size`` None means ``len(tokenizer)``; it may be larger (padded rows), never smaller than
    any special id. The ids are set on both the config and the generation config, so ``generate``
    stops at the tokenizer's ``eos`` and not at ``LlamaConfig``'s default ``eos_token_id=2``. ``seed``
    initialises the weights from a private generator state (the global torch RNG is left as it was).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["eos_token_id"] is None or ids["pad_token_id"] is None:
        raise RecipeError("tiny_causal_lm needs a tokenizer with eos and pad tokens")
    if vocab_size is None:
        vocab_size = len(tokenizer)  # type: ignore[arg-type]
    top = max(v for v in ids.values() if v is not None)
    if top >= vocab_size:
        raise RecipeError(f"vocab_size={vocab_size} is too small for the tokenizer's special id {top}")
    if hidden % heads:
        raise RecipeError(f"hidden={hidden} is not divisible by heads={heads}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, **ids,
    )
    if seed is None:
        model = LlamaForCausalLM(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return model
