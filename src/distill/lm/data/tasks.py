"""Registered language-model tasks: ``arithmetic`` (reasoning with a verifier), ``pytext`` (prose), ``jsonl`` (yours).

These live in ``lm/`` rather than ``tasks/`` because they build on the family's data code
(tokenizers, collation); importing ``distill.lm`` registers them.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from distill.core.registry import TASKS, Params, PathField
from distill.errors import MissingFileError, RecipeError
from distill.lm import models
from distill.lm.data import arithmetic as ar
from distill.lm.data import canary
from distill.lm.data.task import LMTaskData, TokenDataset, tokenizer_fingerprint
from distill.lm.data.text import Example, TextRecord, encode_records, load_records

DEFAULT_STUDENT = {"arch": "llama", "hidden": 64, "layers": 2, "heads": 4}


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- arithmetic


class ArithmeticParams(Params):
    num_train: int = Field(4000, ge=1)
    num_val: int = Field(300, ge=1)
    num_test: int = Field(500, ge=1)
    min_digits: int = Field(1, ge=1)
    max_digits: int = Field(3, ge=1, le=12)
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"])
    negative: bool = Field(False, description="allow a - b with a < b (answers below zero)")
    data_seed: int = Field(0, description="seed of the problems (fixed across run seeds)")
    eval_size: int = Field(200, ge=1, description="validation prompts generated on at each evaluation")

    @model_validator(mode="after")
    def _digits(self) -> "ArithmeticParams":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) exceeds max_digits ({self.max_digits})")
        return self


def distinct_problems(n: int, seed: int, difficulty: ar.Difficulty) -> list[ar.Problem]:
    """``n`` distinct problems (so no test problem is also a training problem)."""
    rng, seen, out = random.Random(seed), set(), []
    tries = 0
    while len(out) < n:
        p = ar.sample_problem(rng, difficulty)
        tries += 1
        if p not in seen:
            seen.add(p)
            out.append(p)
        elif tries > 20 * n + 1000:
            raise RecipeError(f"only {len(out)} distinct problems exist at this difficulty; lower num_train/num_val/num_test")
    return out


@TASKS.register("arithmetic", "multi-digit arithmetic with step-by-step traces; exact match by a verifier (LM)",
                ArithmeticParams)
def build_arithmetic(p: ArithmeticParams) -> LMTaskData:
    difficulty = ar.Difficulty(p.min_digits, p.max_digits, tuple(p.ops), p.negative)
    problems = distinct_problems(p.num_train + p.num_val + p.num_test, p.data_seed, difficulty)
    tok = ar.CharTokenizer()
    hf_tok = tok.to_hf()
    ops = list(dict.fromkeys(p.ops))  # the domains (data samplers, e.g. DDK): one per operation

    def split(ps: list[ar.Problem]) -> TokenDataset:
        prompts = [[tok.bos_token_id] + tok.encode(q.prompt) for q in ps]
        return TokenDataset([ar.encode_problem(q, tok) for q in ps], tok.pad_token_id, prompts, ps,
                            [ops.index(q.op) for q in ps], ops)

    train = split(problems[: p.num_train])
    val = split(problems[p.num_train : p.num_train + p.num_val])
    test = split(problems[p.num_train + p.num_val :])
    longest = max(len(tok.encode(q.completion)) for q in problems)
    data_params = p.model_dump(exclude={"eval_size"})
    return LMTaskData(
        "arithmetic", train, val, test, hf_tok, _fingerprint("arithmetic", data_params, tokenizer_fingerprint(hf_tok)),
        DEFAULT_STUDENT, verify=lambda text, problem: ar.verify(text, problem), max_new_tokens=longest + 2,
        eval_size=p.eval_size,
    )


build_arithmetic.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------- pytext


class PyTextParams(Params):
    block_size: int = Field(128, ge=8)
    vocab_size: int = Field(2048, ge=300, description="byte-level BPE vocabulary (256 bytes + merges + 3 specials)")
    split_seed: int = 0
    canaries: int = Field(0, ge=0, description="planted secrets in the training text (distill.lm.data.canary); 0 = off")
    canary_repeats: int = Field(4, ge=1, description="copies of each canary among the training documents")
    canary_candidates: int = Field(1000, ge=1, description="random candidates each canary is ranked against")
    canary_seed: int = 1234

    @model_serializer(mode="wrap")
    def _drop_canaries_when_off(self, handler):
        # without canaries the dump (hence recipe and data fingerprints) is what it was before they existed
        d = handler(self)
        if not self.canaries:
            for k in ("canaries", "canary_repeats", "canary_candidates", "canary_seed"):
                d.pop(k, None)
        return d


@TASKS.register("pytext", "language modelling on CPython's reference-manual topics, byte-level BPE (LM)", PyTextParams)
def build_pytext_task(p: PyTextParams) -> LMTaskData:
    from distill.lm.data.pytext import build_pytext

    secrets, candidates = canary.make_canaries(p.canaries, p.canary_candidates, p.canary_seed) if p.canaries else ([], [])
    planted = [canary.secret_text(s) for s in secrets for _ in range(p.canary_repeats)]
    d = build_pytext(p.block_size, p.vocab_size, p.split_seed, planted=planted, planted_seed=p.canary_seed)
    pad = d.tokenizer.pad_token_id
    data = LMTaskData(
        "pytext", TokenDataset.from_blocks(d.train, pad), TokenDataset.from_blocks(d.val, pad),
        TokenDataset.from_blocks(d.test, pad), d.tokenizer,
        _fingerprint("pytext", p.model_dump(), d.fingerprint, tokenizer_fingerprint(d.tokenizer)), DEFAULT_STUDENT,
    )
    if secrets:  # reported as test/canary_exposure (and teacher/canary_exposure)
        data.meta.update(canaries=secrets, canary_candidates=candidates)
        data.extra_metrics = lambda model: {"canary_exposure": canary.lm_canary_exposure(model, data)}
    return data


build_pytext_task.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------- jsonl


class JsonlParams(Params):
    train: str = PathField(description="JSONL with prompt/completion or text fields, or a datasets save_to_disk folder")
    val: str | None = PathField(None, description="default: split from train")
    test: str | None = PathField(None, description="default: split from train")
    tokenizer: str = PathField(description="an HF tokenizer folder (usually the teacher's model folder)")
    max_length: int = Field(512, ge=8)
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0, lt=0.5)
    split_seed: int = 0
    eval_size: int = Field(100, ge=1)
    max_new_tokens: int | None = Field(
        None, ge=1, description="greedy completion length at evaluation; default the longest reference completion + 8")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@TASKS.register("jsonl", "your own data: JSONL (or a datasets folder) with prompt/completion or text (LM)",
                JsonlParams)
def build_jsonl(p: JsonlParams) -> LMTaskData:
    """Paths are relative to the recipe file's folder (``PathField``). Prompt/completion data gets exact match of the
    greedy completion against the reference (whitespace-stripped)."""
    tok_dir = Path(p.tokenizer).expanduser()
    if not tok_dir.exists():
        raise MissingFileError(f"task.tokenizer: {tok_dir} does not exist")
    tok = models.load_tokenizer(tok_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # the usual choice; padding is masked everywhere
    if tok.eos_token_id is None:
        raise RecipeError(f"the tokenizer in {tok_dir} has no eos token")
    paths = {k: getattr(p, k) for k in ("train", "val", "test")}
    records = {k: load_records(Path(v).expanduser()) for k, v in paths.items() if v is not None}
    digests = {k: _file_digest(Path(v).expanduser()) for k, v in paths.items() if v is not None}
    return task_from_records(records, tok, p, json.dumps(digests, sort_keys=True), str(paths["train"]))


def task_from_records(records: dict[str, list[TextRecord]], tok: Any, p: JsonlParams, digest: str,
                      where: str = "train") -> LMTaskData:
    """An LM task from prompt/completion or text records (``train``, optional ``val``/``test``: split off
    ``train`` when absent), encoded with ``tok``; ``digest`` identifies the records' source."""
    records = dict(records)
    rng = random.Random(p.split_seed)
    train = records["train"]
    order = list(range(len(train)))
    rng.shuffle(order)
    n_test = 0 if "test" in records else max(1, round(p.test_fraction * len(train)))
    n_val = 0 if "val" in records else max(1, round(p.val_fraction * len(train)))
    if n_test + n_val >= len(train):
        raise RecipeError(f"{where} has {len(train)} records: too few to split off val and test")
    if "test" not in records:
        records["test"] = [train[i] for i in order[:n_test]]
    if "val" not in records:
        records["val"] = [train[i] for i in order[n_test : n_test + n_val]]
    records["train"] = [train[i] for i in order[n_test + n_val :]]

    def split(recs) -> TokenDataset:
        examples: list[Example] = encode_records(recs, tok, p.max_length)
        if recs[0].text is not None:
            return TokenDataset(examples, tok.pad_token_id)
        prompts = [[i for i, l in zip(e.input_ids, e.labels) if l == -100] for e in examples]
        return TokenDataset(examples, tok.pad_token_id, prompts, [r.completion for r in recs])

    sets = [split(records[k]) for k in ("train", "val", "test")]
    max_new = p.max_new_tokens
    if max_new is None:  # evaluation generates no longer than any reference needs (+ room to overrun it)
        max_new = 8 + max((len(e.input_ids) - len(q) for d in sets if d.prompts for e, q in zip(d.examples, d.prompts)),
                          default=120)
    # evaluation-only settings stay out of the data's identity (a teacher cache stays valid across them)
    evaluation = {"train", "val", "test", "tokenizer", "eval_size", "max_new_tokens"}
    return LMTaskData(
        "jsonl", *sets, tok,
        _fingerprint("jsonl", digest, p.model_dump(exclude=evaluation), tokenizer_fingerprint(tok)),
        DEFAULT_STUDENT, verify=lambda text, ref: text.strip() == ref.strip(), max_new_tokens=max_new,
        eval_size=p.eval_size,
    )


build_jsonl.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]
