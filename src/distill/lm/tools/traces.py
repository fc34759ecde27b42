"""Distillation-source analysis: which teacher's traces to distil from, and a diverse SFT set from them.

S51 (Tian et al. 2025, "Not All Correct Answers Are Equal: Why Your Distillation Source Matters",
arXiv 2505.14464) samples the same prompts from several teachers, keeps only verified-correct outputs,
and compares the trace sets by their token-length distribution (wider = better: the best teacher's
data "exhibits greater token length diversity") and their perplexity under a fixed language model
(lower = better; S51 scores with a strong 32B model, we score with the student that will be trained).
S19 DED (Wu et al. 2025, "Beyond Scaling Law: A Data-Efficient Distillation Framework for Reasoning",
arXiv 2508.09883) finds that a teacher's benchmark score alone does not make it the best teacher, and
that several diverse correct trajectories per question make a small SFT corpus go further.

Per teacher's trace set (``n`` samples per prompt) we report:

- lengths: completion tokens without the final ``eos``: mean, population std (ddof 0), coefficient of
  variation ``std / mean`` (S51's length diversity), min, 10/50/90 % quantiles (numpy's linear
  interpolation), max, and the total;
- correctness by the task's verifier: ``accuracy`` (share of traces that end with ``eos`` and that
  the verifier accepts; a trace cut at ``max_new_tokens`` is not a complete answer), ``coverage``
  (share of prompts with at least one correct trace) and ``finished`` (share ending with ``eos``);
- diversity: ``distinct_n`` (Li et al. 2016: distinct n-grams / all n-grams, pooled over the set),
  ``pairwise_diversity`` (within a prompt, the mean over pairs of its traces of the token edit distance
  divided by the longer length; averaged over prompts), ``unique_rate`` (distinct traces / traces per
  prompt, averaged) and ``correct_distinct`` (distinct correct traces per prompt: the SFT examples a
  prompt can give);
- under the student: ``student_nll`` = mean token NLL of the traces' supervised tokens (completion and
  ``eos``, exactly what SFT on them trains), ``student_ppl = exp(student_nll)``, and the same over
  the correct traces only (``*_correct``: the data SFT would use).

Teacher selection (our rule; neither paper gives a formula): teachers are ranked on each of
``accuracy`` (higher; S51 keeps only verified traces, so it is the yield of usable data),
``student_nll_correct`` (lower; S51), ``len_cv`` (higher; S51) and ``pairwise_diversity`` (higher;
DED). Rank 1 is best, ties share the mean rank, a missing value ranks last, a criterion nobody has
(no student) is skipped. ``score`` is the mean rank; teachers without a correct trace come last.

SFT data (DED): per prompt, the correct traces, de-duplicated, are chosen greedily: first the one the
student finds most likely (lowest NLL per token; S51), then repeatedly the one farthest (largest
minimum normalised edit distance) from those chosen, up to ``k``. Written as JSONL records
``{"prompt", "completion", "teacher"}`` that the ``jsonl`` task reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.errors import MissingFileError, RecipeError
from distill.lm.losses import token_logprobs
from distill.lm.models import token_logits
from distill.lm.rollout import rollout
from distill.lm.data.text import IGNORE_INDEX, Example, collate, load_jsonl

CRITERIA: tuple[tuple[str, int], ...] = (
    ("accuracy", +1), ("student_nll_correct", -1), ("len_cv", +1), ("pairwise_diversity", +1),
)


@dataclass
class TraceSet:
    """One teacher's traces. Per prompt: its ids (with ``bos``), text and verifier reference (None:
    unknown). Per trace: its prompt (``group``, a position in ``prompts``), completion ids (ending with
    ``eos`` iff ``finished``), text, and once scored, ``correct`` and the student's summed NLL over its
    supervised tokens (``nll``, ``nll_tokens``)."""

    label: str
    source: str
    eos_id: int
    prompts: list[list[int]]
    prompt_texts: list[str]
    references: list[Any]
    group: list[int]
    completions: list[list[int]]
    texts: list[str]
    finished: list[bool]
    correct: list[bool | None] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    nll_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completions)

    def content(self, i: int) -> list[int]:
        """Trace ``i`` without its final ``eos``."""
        c = self.completions[i]
        return c[:-1] if self.finished[i] and c and c[-1] == self.eos_id else c

    @property
    def lengths(self) -> list[int]:
        return [len(self.content(i)) for i in range(len(self))]

    def by_prompt(self) -> list[list[int]]:
        """Trace indices per prompt, in order."""
        out: list[list[int]] = [[] for _ in self.prompts]
        for i, g in enumerate(self.group):
            out[g].append(i)
        return out


# --- building trace sets -------------------------------------------------------------------------

def sample_traces(model: nn.Module, data: Any, label: str, *, split: str = "train", num_prompts: int = 64,
                  samples: int = 4, temperature: float = 1.0, max_new_tokens: int | None = None,
                  batch_size: int = 64, seed: int = 0, source: str = "") -> TraceSet:
    """``samples`` completions of each of the first ``num_prompts`` prompts of ``data``'s ``split``,
    sampled at ``temperature`` from ``seed`` (the global RNG is left as it was)."""
    ds = getattr(data, split, None)
    if ds is None or getattr(ds, "prompts", None) is None:
        raise RecipeError(f"the task's {split} split has no prompts: analysing traces needs a prompt/completion task")
    n = min(num_prompts, len(ds))
    tok = data.tokenizer
    prompts, refs = ds.prompts[:n], (ds.references[:n] if ds.references is not None else [None] * n)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        r = rollout(model, prompts, max_new_tokens=max_new_tokens or data.max_new_tokens, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, temperature=temperature, num_samples=samples, batch_size=batch_size)
    return TraceSet(label, source, tok.eos_token_id, [list(p) for p in prompts],
                    [tok.decode(p, skip_special_tokens=True) for p in prompts], list(refs),
                    [i for i in range(n) for _ in range(samples)], r.completions, r.texts(tok), r.finished)


def _reference_index(data: Any) -> dict[str, Any]:
    """Prompt text -> verifier reference over the task's splits."""
    out: dict[str, Any] = {}
    for name in ("train", "val", "test"):
        ds = getattr(data, name, None)
        if ds is None or ds.prompts is None or ds.references is None:
            continue
        for p, ref in zip(ds.prompts, ds.references):
            out.setdefault(data.tokenizer.decode(p, skip_special_tokens=True), ref)
    return out


def read_traces(path: str | Path, data: Any, label: str) -> TraceSet:
    """Traces from a JSONL file of ``{"prompt", "completion"}`` records (e.g. another tool's samples, or
    ``traces/<teacher>.jsonl`` written here), tokenized like the ``jsonl`` task: ``[bos] prompt`` and
    ``completion [eos]`` (every trace counts as finished). Prompts are matched to the task's prompts by
    text to find their verifier references; an unmatched prompt's traces are not verified."""
    records = load_jsonl(path)
    if records[0].text is not None:
        raise RecipeError(f"{path}: traces need 'prompt' and 'completion' fields, not 'text'")
    tok = data.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    refs = _reference_index(data)
    order: dict[str, int] = {}
    prompts, prompt_texts, references, group, completions, texts = [], [], [], [], [], []
    for rec in records:
        p = rec.prompt or ""
        if p not in order:
            order[p] = len(prompts)
            prompts.append(bos + list(tok(p, add_special_tokens=False)["input_ids"]))
            prompt_texts.append(p)
            references.append(refs.get(p))
        group.append(order[p])
        completions.append(list(tok(rec.completion or "", add_special_tokens=False)["input_ids"]) + [tok.eos_token_id])
        texts.append(rec.completion or "")
    return TraceSet(label, str(path), tok.eos_token_id, prompts, prompt_texts, references, group, completions,
                    texts, [True] * len(completions))


def verify_traces(ts: TraceSet, verify: Callable[[str, Any], bool] | None) -> None:
    """``ts.correct``: finished and accepted by the verifier; None where there is no verifier or reference."""
    ts.correct = [
        None if verify is None or ts.references[g] is None else bool(fin and verify(text, ts.references[g]))
        for g, text, fin in zip(ts.group, ts.texts, ts.finished)
    ]


@torch.no_grad()
def score_traces(ts: TraceSet, student: nn.Module, vocab: int, pad_id: int, batch_size: int = 64) -> None:
    """``ts.nll`` / ``ts.nll_tokens``: each trace's summed NLL under ``student`` over its supervised tokens
    (completion, ``eos`` included when finished; the prompt is context only) and their count."""
    was = student.training
    student.eval()
    device = next(student.parameters()).device
    nll, count = [], []
    try:
        for s in range(0, len(ts), batch_size):
            ex = [Example(ts.prompts[g] + c, [IGNORE_INDEX] * len(ts.prompts[g]) + c)
                  for g, c in zip(ts.group[s : s + batch_size], ts.completions[s : s + batch_size])]
            batch = {k: v.to(device) for k, v in collate(ex, pad_id).items()}
            lp, mask = token_logprobs(token_logits(student, batch, vocab), batch["labels"])
            nll += (-lp.sum(-1)).tolist()
            count += mask.sum(-1).tolist()
    finally:
        student.train(was)
    ts.nll, ts.nll_tokens = [float(x) for x in nll], [int(x) for x in count]


# --- statistics ----------------------------------------------------------------------------------

def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, population std, coefficient of variation, min, 10/50/90 % quantiles, max, total."""
    x = np.asarray(lengths, dtype=np.float64)
    if x.size == 0:
        return {k: math.nan for k in ("len_mean", "len_std", "len_cv", "len_min", "len_p10", "len_p50", "len_p90",
                                      "len_max")} | {"tokens": 0}
    mean, std = float(x.mean()), float(x.std())
    q10, q50, q90 = (float(v) for v in np.quantile(x, [0.1, 0.5, 0.9]))
    return {"len_mean": mean, "len_std": std, "len_cv": std / mean if mean > 0 else math.nan,
            "len_min": float(x.min()), "len_p10": q10, "len_p50": q50, "len_p90": q90, "len_max": float(x.max()),
            "tokens": int(x.sum())}


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over the sequences pooled (0 when there is none)."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit insert, delete, substitute) between token sequences; one numpy row
    per token of the longer sequence (the insertion chain of a row is a running minimum)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    bb = np.asarray(b)
    cols = np.arange(len(b) + 1)
    prev = cols.copy()
    row = np.empty_like(prev)
    for i, x in enumerate(a, 1):
        row[0] = i
        np.minimum(prev[1:] + 1, prev[:-1] + (bb != x), out=row[1:])
        prev = np.minimum.accumulate(row - cols) + cols  # row[j] = min_{k<=j} row[k] + (j - k)
    return int(prev[-1])


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Edit distance / the longer length, in [0, 1] (0 for two empty sequences)."""
    m = max(len(a), len(b))
    return edit_distance(a, b) / m if m else 0.0


def pairwise_diversity(groups: Sequence[Sequence[Sequence[int]]]) -> float:
    """Mean over groups with at least two sequences of the mean normalised edit distance over their
    pairs (NaN when no group has two)."""
    per = [float(np.mean([normalized_edit_distance(a, b) for a, b in combinations(g, 2)]))
           for g in groups if len(g) >= 2]
    return float(np.mean(per)) if per else math.nan


def trace_stats(ts: TraceSet, ngrams: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """The statistics of the module docstring, one flat row."""
    groups = ts.by_prompt()
    contents = [ts.content(i) for i in range(len(ts))]
    verified = [c for c in ts.correct if c is not None] if ts.correct else []
    row: dict[str, Any] = {"teacher": ts.label, "prompts": len(ts.prompts), "traces": len(ts)}
    row["accuracy"] = sum(verified) / len(verified) if verified else math.nan
    covered = [any(ts.correct[i] for i in g) for g in groups if g and ts.correct and ts.correct[g[0]] is not None]
    row["coverage"] = sum(covered) / len(covered) if covered else math.nan
    row["finished"] = sum(ts.finished) / len(ts) if len(ts) else math.nan
    row |= length_stats(ts.lengths)
    for n in ngrams:
        row[f"distinct_{n}"] = distinct_n(contents, n)
    row["pairwise_diversity"] = pairwise_diversity([[contents[i] for i in g] for g in groups])
    row["unique_rate"] = float(np.mean([len({tuple(ts.completions[i]) for i in g}) / len(g) for g in groups if g]))
    row["correct_distinct"] = float(np.mean([len({tuple(ts.completions[i]) for i in g if ts.correct[i]})
                                             for g in groups])) if verified else math.nan
    for suffix, keep in (("", lambda i: True), ("_correct", lambda i: bool(ts.correct and ts.correct[i]))):
        idx = [i for i in range(len(ts)) if keep(i)] if ts.nll else []
        tokens = sum(ts.nll_tokens[i] for i in idx)
        nll = sum(ts.nll[i] for i in idx) / tokens if tokens else math.nan
        row[f"student_nll{suffix}"] = nll
        row[f"student_ppl{suffix}"] = math.exp(min(nll, 50.0)) if not math.isnan(nll) else math.nan
    return row


def _ranks(values: Sequence[float], sign: int) -> list[float]:
    """Rank 1 = best (highest ``sign * value``); ties share the mean rank; NaN ranks last."""
    n = len(values)
    key = [(-sign * v) if not math.isnan(v) else math.inf for v in values]
    order = sorted(range(n), key=lambda i: key[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and key[order[j + 1]] == key[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_teachers(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with ``score`` (mean rank over ``CRITERIA``; see the module docstring) and ``rank``,
    best first."""
    rows = [dict(r) for r in rows]
    used = [(k, s) for k, s in CRITERIA if any(not _nan(r.get(k)) for r in rows)]
    per = {k: _ranks([_f(r.get(k)) for r in rows], s) for k, s in used}
    for i, r in enumerate(rows):
        r["score"] = float(np.mean([per[k][i] for k, _ in used])) if used else math.nan
    useless = [not (_f(r.get("accuracy")) > 0) and not _nan(r.get("accuracy")) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (useless[i], rows[i]["score"], -_f(rows[i].get("accuracy"), 0.0),
                                                    rows[i]["teacher"]))
    out = [rows[i] for i in order]
    for k, r in enumerate(out, 1):
        r["rank"] = k
    return out


def _f(v: Any, default: float = math.nan) -> float:
    return float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else default


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# --- SFT data ------------------------------------------------------------------------------------

def select_diverse(ts_list: Sequence[TraceSet], k: int) -> list[dict[str, str]]:
    """Up to ``k`` correct, de-duplicated traces per prompt (pooled over ``ts_list``, matched by prompt
    text), chosen greedily for diversity (module docstring); records in prompt order."""
    if k < 1:
        raise RecipeError(f"k must be >= 1, not {k}")
    prompts: dict[str, list[tuple[TraceSet, int]]] = {}
    for ts in ts_list:
        for i, g in enumerate(ts.group):
            lst = prompts.setdefault(ts.prompt_texts[g], [])
            if ts.correct and ts.correct[i]:
                lst.append((ts, i))
    records = []
    for prompt, cands in prompts.items():
        seen, uniq = set(), []
        for ts, i in cands:
            key = tuple(ts.content(i))
            if key not in seen:
                seen.add(key)
                uniq.append((ts, i))
        if not uniq:
            continue
        per_token = [ts.nll[i] / max(ts.nll_tokens[i], 1) if ts.nll else 0.0 for ts, i in uniq]
        order = sorted(range(len(uniq)), key=lambda j: (per_token[j], j))
        chosen = [order[0]]
        rest = order[1:]
        while rest and len(chosen) < k:
            far = [min(normalized_edit_distance(uniq[j][0].content(uniq[j][1]), uniq[c][0].content(uniq[c][1]))
                       for c in chosen) for j in rest]
            best = max(range(len(rest)), key=lambda t: (far[t], -t))
            chosen.append(rest.pop(best))
        for j in chosen:
            ts, i = uniq[j]
            records.append({"prompt": prompt, "completion": ts.texts[i], "teacher": ts.label})
    return records


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def trace_records(ts: TraceSet) -> list[dict[str, Any]]:
    """Every trace of a set with what was measured on it (readable again by :func:`read_traces`)."""
    out = []
    for i, g in enumerate(ts.group):
        out.append({"prompt": ts.prompt_texts[g], "completion": ts.texts[i], "teacher": ts.label,
                    "finished": ts.finished[i], "correct": ts.correct[i] if ts.correct else None,
                    "tokens": len(ts.content(i)),
                    "student_nll": ts.nll[i] / max(ts.nll_tokens[i], 1) if ts.nll else None})
    return out


# --- the analysis --------------------------------------------------------------------------------

@dataclass
class TraceReport:
    rows: list[dict[str, Any]]  # ranked, best first
    sets: list[TraceSet]
    out: Path
    sft_path: Path | None = None
    sft_records: int = 0


def build_lm_task(name: str, overrides: Sequence[str] = ()) -> Any:
    """A registered language-model task by name with ``key=value`` parameter overrides."""
    from pydantic import ValidationError

    from distill.core.recipe import parse_override
    from distill.core.registry import TASKS

    entry = TASKS.get(name)
    kw: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        if len(path) != 1:
            raise RecipeError(f"--set '{item}': give a task parameter, e.g. num_train=500")
        kw[path[0]] = value
    try:
        params = entry.params.model_validate(kw)
    except ValidationError as err:
        e = err.errors()[0]
        raise RecipeError(f"task '{name}' parameter '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}") from None
    data = entry.obj(params)
    if getattr(data, "family", None) != "lm":
        raise RecipeError(f"task '{name}' is not a language-model task; use arithmetic or jsonl")
    return data


def _labels(sources: Sequence[Path]) -> list[str]:
    out: list[str] = []
    for s in sources:
        base = s.parent.name if s.name == "student" else (s.stem if s.is_file() else s.name)
        label, k = base, 2
        while label in out:
            label, k = f"{base}-{k}", k + 1
        out.append(label)
    return out


def analyze_traces(sources: Sequence[str | Path], data: Any, out: str | Path, *, student: str | Path | None = None,
                   split: str = "train", num_prompts: int = 64, samples: int = 4, temperature: float = 1.0,
                   max_new_tokens: int | None = None, batch_size: int = 64, seed: int = 0, sft_k: int = 0,
                   sft_from: str = "best", device: str | None = None,
                   on_teacher: Callable[[str], None] | None = None) -> TraceReport:
    """S19 DED / S51: per source (a teacher run or model folder, sampled here; or a trace JSONL file)
    the statistics of the module docstring, the teachers ranked, and ``out/`` written:
    ``traces_report.md``, ``traces.csv``, ``traces.png``, ``traces/<teacher>.jsonl`` and, with
    ``sft_k > 0``, ``sft.jsonl`` (up to ``sft_k`` diverse correct traces per prompt from the best
    teacher, from ``all`` teachers pooled, or from the teacher of that label)."""
    paths = [Path(s).expanduser() for s in sources]
    if not paths:
        raise RecipeError("give at least one teacher (a run or model folder, or a trace JSONL file)")
    for p in paths:
        if not p.exists():
            raise MissingFileError(f"teacher {p} does not exist (a run or model folder, or a trace JSONL file)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out).expanduser()
    labels = _labels(paths)
    if sft_k > 0 and sft_from not in ("best", "all", *labels):
        raise RecipeError(f"--sft-from '{sft_from}': use best, all or a teacher label ({', '.join(labels)})")
    stu = data.load_model(Path(student).expanduser()).to(dev) if student is not None else None
    sets = []
    for path, label in zip(paths, labels):
        if on_teacher is not None:
            on_teacher(label)
        if path.is_file():
            ts = read_traces(path, data, label)
        else:
            model = data.load_model(path).to(dev)
            ts = sample_traces(model, data, label, split=split, num_prompts=num_prompts, samples=samples,
                               temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               seed=seed, source=str(path))
            del model
        verify_traces(ts, data.verify)
        if stu is not None:
            score_traces(ts, stu, data.vocab, data.tokenizer.pad_token_id, batch_size)
        sets.append(ts)
    rows = rank_teachers([trace_stats(ts) for ts in sets])
    out.mkdir(parents=True, exist_ok=True)
    for ts in sets:
        write_jsonl(out / "traces" / f"{ts.label}.jsonl", trace_records(ts))
    report = TraceReport(rows, sets, out)
    if sft_k > 0:
        chosen = sets if sft_from == "all" else [
            next(ts for ts in sets if ts.label == (rows[0]["teacher"] if sft_from == "best" else sft_from))]
        records = select_diverse(chosen, sft_k)
        report.sft_path, report.sft_records = out / "sft.jsonl", len(records)
        write_jsonl(report.sft_path, records)
    settings = {"task": getattr(data, "name", "?"), "split": split, "prompts": num_prompts, "samples": samples,
                "temperature": temperature, "seed": seed, "student": str(student) if student else None,
                "teachers": {label: str(p) for label, p in zip(labels, paths)}, "sft_k": sft_k, "sft_from": sft_from}
    write_report(report, settings)
    return report


# --- report --------------------------------------------------------------------------------------

COLUMNS = ("rank", "teacher", "score", "accuracy", "coverage", "len_mean", "len_std", "len_cv", "len_p50",
           "distinct_2", "pairwise_diversity", "correct_distinct", "student_ppl", "student_ppl_correct")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_report(report: TraceReport, settings: dict[str, Any]) -> None:
    from distill.core.report import write_csv

    out = report.out
    write_csv(out / "traces.csv", report.rows)
    plot_traces(out / "traces.png", report)
    cols = [c for c in COLUMNS if any(not _nan(r.get(c)) for r in report.rows)]
    lines = [
        "# Distillation-source analysis (S51, S19 DED)",
        "",
        f"Task `{settings['task']}`, {settings['split']} split: {settings['samples']} samples of each of the first "
        f"{settings['prompts']} prompts per teacher model at temperature {settings['temperature']} (seed "
        f"{settings['seed']}); trace files are read as they are. Student: "
        f"{'`' + settings['student'] + '`' if settings['student'] else 'none (no perplexity)'}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in report.rows],
        "",
        "Ranking: mean rank over accuracy (higher), the student's NLL of the correct traces (lower, S51), "
        "the length coefficient of variation (higher, S51) and the within-prompt pairwise edit diversity "
        "(higher, DED); teachers with no correct trace last. Every column is in `traces.csv`.",
        "",
        f"Selected teacher: **{report.rows[0]['teacher']}**.",
        "",
        "![traces](traces.png)",
        "",
        "| teacher | source |",
        "|---|---|",
        *[f"| {label} | `{src}` |" for label, src in settings["teachers"].items()],
        "",
    ]
    if report.sft_path is not None:
        lines += [f"SFT data: `{report.sft_path.name}`, {report.sft_records} records (up to {settings['sft_k']} "
                  f"diverse correct traces per prompt, from {settings['sft_from']}); train on it with "
                  "`task: {name: jsonl, train: sft.jsonl, tokenizer: <teacher folder>}`.", ""]
    (out / "traces_report.md").write_text("\n".join(lines))


def plot_traces(path: Path, report: TraceReport) -> None:
    """Length histograms, correctness bars, diversity bars and, with a student, its perplexity."""
    from distill.core.report import pyplot

    plt = pyplot()
    rows = {r["teacher"]: r for r in report.rows}
    labels = [ts.label for ts in report.sets]
    has_ppl = any(not _nan(r.get("student_ppl")) for r in report.rows)
    fig, axes = plt.subplots(1, 3 + has_ppl, figsize=(4.6 * (3 + has_ppl), 3.6))
    lengths = [ts.lengths for ts in report.sets]
    top = max((max(x) for x in lengths if x), default=1)
    bins = np.linspace(0, top + 1, min(40, top + 2))
    for ts, x in zip(report.sets, lengths):
        axes[0].hist(x, bins=bins, histtype="step", linewidth=1.5, label=ts.label)
    axes[0].set_xlabel("completion tokens"), axes[0].set_title("trace lengths"), axes[0].legend(fontsize=8)

    def bars(ax, keys: Sequence[str], title: str) -> None:
        width = 0.8 / len(keys)
        xs = np.arange(len(labels))
        for j, k in enumerate(keys):
            ax.bar(xs + j * width, [_f(rows[t].get(k), 0.0) for t in labels], width, label=k)
        ax.set_xticks(xs + width * (len(keys) - 1) / 2, labels, rotation=20, fontsize=8)
        ax.set_title(title), ax.legend(fontsize=8)

    bars(axes[1], ("accuracy", "coverage"), "correctness (verifier)")
    bars(axes[2], ("distinct_2", "pairwise_diversity", "unique_rate"), "diversity")
    if has_ppl:
        bars(axes[3], ("student_ppl", "student_ppl_correct"), "perplexity under the student")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
