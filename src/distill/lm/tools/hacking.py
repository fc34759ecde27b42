"""Teacher hacking (S21, Tiapkin et al. 2025, "On Teacher Hacking in Language Model Distillation").

A self-contained, CPU-sized replica of the paper's controlled setup (its Figs. 1-3):

1. an **oracle** LM stands for the ground-truth distribution: a fixed random tiny Llama over a synthetic
   vocabulary, its weights scaled so that its next-token distributions depend on the context and are
   neither uniform nor one-hot (:func:`build_oracle`);
2. a **teacher** is distilled from the oracle (token-level forward KL on fresh oracle samples,
   ``teacher_steps`` updates) towards the oracle at ``teacher_temperature`` (0.5 by default): an
   imperfect approximation of the oracle, overconfident and with finite training;
3. a **student**, smaller than the teacher, starts from a short SFT on oracle samples (the paper's
   stage 1, Fig. 2, initialises the student by SFT on oracle-generated pairs) and is distilled from the
   teacher with :func:`distill.lm.losses.token_divergence` (``forward_kl`` by default, the paper's
   main token-level loss) on completions of prompts sampled from the oracle.

Metrics (the paper's Fig. 3), on ``eval_prompts`` held-out prompts sampled from the oracle:

- **proxy** = distance student ↔ teacher: the mean over the completion tokens of teacher-sampled
  held-out sequences of ``KL(p_teacher ‖ p_student)`` (``metric_kind``, a ``token_divergence`` kind);
- **golden** = distance student ↔ oracle: the same on oracle-sampled held-out sequences with the
  oracle's next-token distributions.

With ``forward_kl`` each is a Monte-Carlo estimate of the sequence-level KL ``E_x E_{y∼π_ref} Σ_t
KL(π_ref(·|x,y<t) ‖ π_S(·|x,y<t))`` divided by the held-out token count. The held-out completions are
sampled once, so a curve's wiggles are the student's, not resampling noise.

**Teacher hacking** (the paper's definition): the proxy keeps improving while the golden metric
deteriorates; the proxy-golden plot (Fig. 4) is U-shaped. :func:`hacking_label` measures it with the
oracle: the smoothed golden metric ends more than ``margin`` above its minimum while the smoothed proxy
ends below its value at that minimum.

**Detection without an oracle** (abstract: "we can detect it by observing when the optimization process
deviates from polynomial convergence laws"; Figs. 5 and 8 in log-log scale): without hacking the proxy
converges polynomially, ``proxy(t) ≈ a·t^(−b)``, a straight line in log-log scale; with a fixed offline
dataset it bends away from that line (stagnates) as hacking sets in. :func:`convergence_deviation` makes
the observation a number: fit ``log v = log a − b·log t`` by least squares on an early window
(``fit_range``, fractions of the run), extrapolate, and flag the curve when its smoothed log-residual
above the law exceeds ``tolerance`` from some step (the onset) to the end. ``detected`` applies it to
the proxy (no oracle needed); it is also computed for the golden curve and the training loss. The paper
shows the deviation in plots and states no numeric rule: the window, tolerance and smoothing are ours.

Data regimes (Figs. 5-7): a pool of ``num_prompts`` training prompts sampled from the oracle, and

- ``offline``: one teacher completion per prompt, generated once; every step draws from that fixed
  dataset (reshuffled epochs);
- ``online_student`` / ``online_teacher``: every step, fresh completions of the step's prompts sampled
  from the current student (on-policy) or from the teacher, with :func:`distill.lm.rollout.rollout`;
- ``multi_gen``: offline with ``generations`` teacher completions per prompt, generated once (Fig. 7:
  a larger generation budget per prompt).

Deviations from the paper (no official code is public): T5 encoder-decoders on XSum, WMT-14 and
Natural Instructions become tiny decoder-only Llamas on a synthetic vocabulary; the oracle is random,
not fine-tuned; the teacher's imperfection is made explicit (a sharpened, briefly trained copy) rather
than left to capacity and data; the teacher is distilled with soft token KL rather than SFT on oracle
pairs; one held-out sample per prompt; the detection rule is our numeric reading of the paper's plots.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import RecipeError
from distill.lm.losses import KINDS, token_cross_entropy, token_divergence
from distill.lm.models import token_logits
from distill.lm.rollout import rollout
from distill.lm.data.text import Example, collate, tiny_causal_lm

REGIMES = ("offline", "online_student", "online_teacher", "multi_gen")

__all__ = [
    "REGIMES",
    "Deviation",
    "HackingConfig",
    "HackingResults",
    "PowerLaw",
    "RegimeCurve",
    "SyntheticVocab",
    "build_oracle",
    "convergence_deviation",
    "distance",
    "fit_power_law",
    "hacking_label",
    "make_source",
    "plot",
    "run_hacking",
    "write_outputs",
]


# ----------------------------------------------------------------------------------------------------
# vocabulary and models


@dataclass(frozen=True)
class SyntheticVocab:
    """``size`` ordinary tokens ``0..size-1`` followed by ``<bos>``, ``<eos>``, ``<pad>``."""

    size: int = 16

    @property
    def bos_token_id(self) -> int:
        return self.size

    @property
    def eos_token_id(self) -> int:
        return self.size + 1

    @property
    def pad_token_id(self) -> int:
        return self.size + 2

    def __len__(self) -> int:
        return self.size + 3

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        names = {self.bos_token_id: "<bos>", self.eos_token_id: "<eos>", self.pad_token_id: "<pad>"}
        return " ".join(names.get(int(i), f"t{int(i)}") for i in ids
                        if not (skip_special_tokens and int(i) in names))


def build_oracle(vocab: SyntheticVocab, hidden: int, layers: int, heads: int, *, init_scale: float,
                 sharpness: float, seed: int) -> nn.Module:
    """The fixed ground-truth LM: a random tiny Llama whose weight matrices are multiplied by
    ``init_scale`` (so that attention and MLPs, not just the current token, shape the output) and whose
    lm_head is multiplied by ``sharpness`` (HF's 0.02 init gives near-uniform next-token distributions).
    The head gets a bias of −30 on the special tokens, so the oracle never emits them: its samples have
    exactly the requested length."""
    model = tiny_causal_lm(None, hidden, layers, heads, vocab, seed=seed)
    head = model.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(init_scale)
        biased.weight.copy_(head.weight * sharpness)
        biased.bias.zero_()
        # bos/eos/pad never sampled: every sequence has its full length and the oracle is a
        # distribution over the ordinary tokens only (exp(-30) underflows nothing in float32)
        biased.bias[vocab.size:] = -30.0
    model.set_output_embeddings(biased)
    model.eval().requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# configuration


@dataclass
class HackingConfig:
    """Sizes, steps, regimes and seed of one teacher-hacking experiment (defaults: about 50 s on one core
    for the four regimes; :meth:`quick`: a few seconds).

    ``steps`` student updates of ``batch_size`` sequences per regime; ``num_prompts`` training prompts
    (the offline dataset has ``num_prompts`` sequences, ``multi_gen`` ``num_prompts·generations``);
    ``eval_prompts`` held-out prompts for the proxy and golden metrics, evaluated at step 0, at every
    step up to ``2·eval_every`` (dense early points for the log-log fit), then every ``eval_every``
    steps. The student (``student_hidden``/``student_layers``) is smaller than the teacher; the teacher
    learns the oracle sharpened by ``teacher_temperature`` < 1 in ``teacher_steps`` updates. ``kind`` is
    the training divergence and ``metric_kind`` the metrics' (``distill.lm.losses.KINDS``). Detection:
    :func:`convergence_deviation` with ``fit_range``, ``tolerance``, ``smooth`` (evaluations);
    :func:`hacking_label` with ``margin`` and the same ``smooth``."""

    vocab: int = 16
    prompt_len: int = 4
    completion_len: int = 12
    oracle_hidden: int = 32
    oracle_layers: int = 2
    oracle_init_scale: float = 3.0
    oracle_sharpness: float = 6.0
    teacher_hidden: int = 32
    teacher_layers: int = 2
    teacher_steps: int = 300
    teacher_temperature: float = 0.5
    student_hidden: int = 16
    student_layers: int = 1
    student_init_steps: int = 40
    heads: int = 2
    num_prompts: int = 16
    generations: int = 4
    eval_prompts: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 2e-3
    teacher_lr: float = 3e-3
    kind: str = "forward_kl"
    metric_kind: str = "forward_kl"
    temperature: float = 1.0
    regimes: tuple[str, ...] = ("offline", "online_student", "online_teacher", "multi_gen")
    eval_every: int = 5
    fit_range: tuple[float, float] = (0.05, 0.3)
    tolerance: float = 0.2
    smooth: int = 9
    margin: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        self.regimes = tuple(self.regimes)
        self.fit_range = tuple(self.fit_range)  # type: ignore[assignment]
        positive = ("vocab", "completion_len", "oracle_hidden", "oracle_layers", "teacher_hidden", "teacher_layers",
                    "student_hidden", "student_layers", "heads", "num_prompts", "generations", "eval_prompts",
                    "batch_size", "steps", "eval_every", "smooth")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise RecipeError(f"hacking: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("prompt_len", "teacher_steps", "student_init_steps"):
            if int(getattr(self, name)) < 0:
                raise RecipeError(f"hacking: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "teacher_lr", "temperature", "teacher_temperature", "oracle_init_scale", "oracle_sharpness"):
            if not float(getattr(self, name)) > 0:
                raise RecipeError(f"hacking: {name} must be > 0, got {getattr(self, name)}")
        for name in ("oracle_hidden", "teacher_hidden", "student_hidden"):
            if getattr(self, name) % self.heads:
                raise RecipeError(f"hacking: {name}={getattr(self, name)} is not divisible by heads={self.heads}")
        for name in ("kind", "metric_kind"):
            if getattr(self, name) not in KINDS:
                raise RecipeError(f"hacking: {name} '{getattr(self, name)}' is not one of {', '.join(KINDS)}")
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad or not self.regimes or len(set(self.regimes)) != len(self.regimes):
            raise RecipeError(f"hacking: regimes {list(self.regimes)} must be distinct names from {', '.join(REGIMES)}")
        lo, hi = self.fit_range
        if not 0 <= lo < hi < 1:
            raise RecipeError(f"hacking: fit_range {self.fit_range} must satisfy 0 <= start < end < 1")
        if self.tolerance <= 0 or self.margin < 0:
            raise RecipeError("hacking: tolerance must be > 0 and margin >= 0")
        if self.steps < 10:
            raise RecipeError(f"hacking: steps={self.steps} is too few to fit a convergence law; use >= 10")

    @classmethod
    def quick(cls, **overrides: Any) -> HackingConfig:
        """A few-second configuration for tests and smoke runs (same shapes, much smaller)."""
        small = dict(vocab=8, prompt_len=2, completion_len=6, oracle_hidden=16, teacher_hidden=8, teacher_steps=20,
                     student_hidden=16, student_init_steps=5, num_prompts=8, generations=2, eval_prompts=16,
                     batch_size=4, steps=12, eval_every=1, smooth=3)
        return cls(**{**small, **overrides})


# ----------------------------------------------------------------------------------------------------
# metrics


def _batch(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    return collate(list(examples), pad_id)


@torch.no_grad()
def distance(student: nn.Module, batch: dict[str, Tensor], ref_logits: Tensor, vocab: int,
             kind: str = "forward_kl") -> float:
    """Mean over ``batch``'s supervised tokens of the per-token divergence ``kind`` between the reference
    distributions ``ref_logits`` (teacher: proxy; oracle: golden) and the student's:
    ``KL(p_ref ‖ p_student)`` for ``forward_kl`` (``token_divergence``'s teacher = the reference)."""
    was = student.training
    student.eval()
    try:
        s = token_logits(student, batch, vocab).float()
        return float(token_divergence(s, ref_logits, batch["labels"], kind))
    finally:
        student.train(was)


def _completions(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: HackingConfig, vocab: SyntheticVocab,
                 num_samples: int = 1) -> list[Example]:
    r = rollout(model, prompts, max_new_tokens=cfg.completion_len, eos_id=vocab.eos_token_id,
                pad_id=vocab.pad_token_id, temperature=cfg.temperature, num_samples=num_samples)
    return r.examples()


def _sample_prompts(oracle: nn.Module, n: int, cfg: HackingConfig, vocab: SyntheticVocab) -> list[list[int]]:
    """``n`` prompts ``[bos] + x`` with ``x`` sampled from the oracle (``prompt_len`` tokens, fewer when the
    oracle emits ``eos``, which is dropped)."""
    if cfg.prompt_len == 0:
        return [[vocab.bos_token_id] for _ in range(n)]
    r = rollout(oracle, [[vocab.bos_token_id]], max_new_tokens=cfg.prompt_len, eos_id=vocab.eos_token_id,
                pad_id=vocab.pad_token_id, temperature=cfg.temperature, num_samples=n)
    return [[vocab.bos_token_id] + [t for t in c if t != vocab.eos_token_id] for c in r.completions]


# ----------------------------------------------------------------------------------------------------
# data regimes


class _Source:
    """Where a regime's training sequences come from: ``batch(step, student) -> list[Example]``."""

    name: str

    def batch(self, step: int, student: nn.Module) -> list[Example]:  # pragma: no cover - interface
        raise NotImplementedError


class FixedSource(_Source):
    """Offline data: ``dataset`` is generated once; ``batch`` walks over it in reshuffled epochs."""

    def __init__(self, name: str, dataset: list[Example], batch_size: int, seed: int) -> None:
        self.name, self.dataset, self.batch_size = name, dataset, batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def batch(self, step: int, student: nn.Module) -> list[Example]:
        out: list[Example] = []
        while len(out) < self.batch_size:
            if not self._order:
                self._order = torch.randperm(len(self.dataset), generator=self._gen).tolist()
            out.append(self.dataset[self._order.pop()])
        return out


class OnlineSource(_Source):
    """Online data: the step's prompts (reshuffled epochs over the pool) completed afresh by the current
    student (``online_student``, on-policy) or by the teacher (``online_teacher``)."""

    def __init__(self, name: str, prompts: list[list[int]], teacher: nn.Module | None, cfg: HackingConfig,
                 vocab: SyntheticVocab, seed: int) -> None:
        self.name, self.prompts, self.teacher, self.cfg, self.vocab = name, prompts, teacher, cfg, vocab
        self._gen = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def batch(self, step: int, student: nn.Module) -> list[Example]:
        chosen = []
        while len(chosen) < self.cfg.batch_size:
            if not self._order:
                self._order = torch.randperm(len(self.prompts), generator=self._gen).tolist()
            chosen.append(self.prompts[self._order.pop()])
        return _completions(self.teacher if self.teacher is not None else student, chosen, self.cfg, self.vocab)


def make_source(regime: str, prompts: list[list[int]], teacher: nn.Module, cfg: HackingConfig,
                vocab: SyntheticVocab) -> _Source:
    """The data source of ``regime`` over the training ``prompts``; offline datasets are generated here,
    once, from the teacher (global torch RNG)."""
    seed = cfg.seed + 1
    if regime == "offline":
        return FixedSource(regime, _completions(teacher, prompts, cfg, vocab), cfg.batch_size, seed)
    if regime == "multi_gen":
        return FixedSource(regime, _completions(teacher, prompts, cfg, vocab, cfg.generations), cfg.batch_size, seed)
    if regime == "online_student":
        return OnlineSource(regime, prompts, None, cfg, vocab, seed)
    if regime == "online_teacher":
        return OnlineSource(regime, prompts, teacher, cfg, vocab, seed)
    raise RecipeError(f"hacking: unknown regime '{regime}'; use one of {', '.join(REGIMES)}")


# ----------------------------------------------------------------------------------------------------
# convergence law and detection


@dataclass(frozen=True)
class PowerLaw:
    """``v(t) = a · t^(−b)`` (a straight line of slope ``−b`` in log-log scale)."""

    log_a: float
    b: float

    def __call__(self, t: float) -> float:
        return math.exp(self.log_a - self.b * math.log(t))


def fit_power_law(steps: Sequence[float], values: Sequence[float]) -> PowerLaw:
    """Least squares of ``log v = log a − b·log t`` over the points with ``t > 0`` and ``v > 0``."""
    pts = [(math.log(t), math.log(v)) for t, v in zip(steps, values) if t > 0 and v > 0]
    if len(pts) < 2:
        raise RecipeError("a power law needs at least two points with positive step and value; run more steps")
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        raise RecipeError("a power law needs at least two distinct steps; widen fit_range")
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return PowerLaw(my - slope * mx, -slope)


@dataclass(frozen=True)
class Deviation:
    """A curve against its early power law: ``fit`` on steps in ``[fit_start, fit_end]``, the smoothed
    log-residuals ``log v_t − log law(t)`` at every step ``t > 0`` (``residuals``, aligned with
    ``steps``), ``onset`` = the first step after the window from which every later smoothed residual
    exceeds ``tolerance``, over at least ``smooth`` evaluations (None: never), ``flagged`` = an onset
    exists."""

    fit: PowerLaw
    fit_start: int
    fit_end: int
    steps: list[int]
    residuals: list[float]
    onset: int | None
    max_residual: float

    @property
    def flagged(self) -> bool:
        return self.onset is not None


def _running_median(xs: Sequence[float], window: int) -> list[float]:
    half = window // 2
    out = []
    for i in range(len(xs)):
        w = sorted(xs[max(0, i - half): i + half + 1])
        m = len(w)
        out.append(w[m // 2] if m % 2 else 0.5 * (w[m // 2 - 1] + w[m // 2]))
    return out


def convergence_deviation(steps: Sequence[int], values: Sequence[float], fit_range: tuple[float, float] = (0.05, 0.3),
                          tolerance: float = 0.2, smooth: int = 9) -> Deviation:
    """The paper's detection signal (S21, abstract; Figs. 5 and 8): deviation of ``values`` (a proxy, golden or
    loss curve over optimizer ``steps``) from the polynomial convergence law fitted on its early part.

    The law is fitted on the steps ``t`` with ``fit_range[0]·T ≤ t ≤ fit_range[1]·T`` (``T`` = the last
    step; at least the first two positive steps); residuals are ``log v_t − log(a·t^(−b))`` smoothed by a
    running median of ``smooth`` points; the curve is flagged when, after the window, the smoothed
    residual exceeds ``tolerance`` (a log-ratio: 0.2 ≈ 22 % above the law) at some step (the onset) and
    at every later one, for at least ``smooth`` evaluations. Only upward deviations count: converging
    faster than the law is not hacking."""
    pts = [(int(t), float(v)) for t, v in zip(steps, values) if t > 0 and v > 0 and math.isfinite(v)]
    if len(pts) < 3:
        raise RecipeError("convergence_deviation needs at least 3 evaluations after step 0; run more steps")
    ts = [t for t, _ in pts]
    last = ts[-1]
    lo, hi = fit_range[0] * last, fit_range[1] * last
    window = [(t, v) for t, v in pts if lo <= t <= hi]
    if len(window) < 2:
        window = pts[:2]
    law = fit_power_law([t for t, _ in window], [v for _, v in window])
    raw = [math.log(v) - math.log(law(t)) for t, v in pts]
    res = _running_median(raw, smooth)
    end = window[-1][0]
    onset, run = None, 0
    for t, r in zip(reversed(ts), reversed(res)):
        if t <= end or r <= tolerance:
            break
        onset, run = t, run + 1
    if run < smooth:  # a deviation must last at least one smoothing window: the last few points are not a trend
        onset = None
    after = [r for t, r in zip(ts, res) if t > end]
    return Deviation(law, window[0][0], end, ts, res, onset, max(after) if after else 0.0)


def _running_mean(xs: Sequence[float], window: int) -> list[float]:
    half = window // 2
    return [sum(xs[max(0, i - half): i + half + 1]) / len(xs[max(0, i - half): i + half + 1]) for i in range(len(xs))]


def hacking_label(steps: Sequence[int], proxy: Sequence[float], golden: Sequence[float], margin: float = 0.05,
                  smooth: int = 5) -> dict[str, Any]:
    """Teacher hacking by its definition (S21; needs the oracle): after smoothing both curves
    (running mean of ``smooth`` points), the golden metric ends more than ``margin`` (relative) above its
    minimum while the proxy ends below its value at that minimum (the proxy kept improving as the
    golden metric deteriorated). Returns ``hacking``, ``golden_min_step``, ``golden_rise`` (relative rise
    from the minimum to the end) and ``proxy_drop_after`` (relative proxy decrease over the same span)."""
    if not (len(steps) == len(proxy) == len(golden)) or not steps:
        raise ValueError("steps, proxy and golden must be non-empty and of the same length")
    p, g = _running_mean(proxy, smooth), _running_mean(golden, smooth)
    i = min(range(len(g)), key=g.__getitem__)
    rise = g[-1] / g[i] - 1 if g[i] > 0 else 0.0
    drop = 1 - p[-1] / p[i] if p[i] > 0 else 0.0
    return {"hacking": bool(rise > margin and drop > 0), "golden_min_step": int(steps[i]), "golden_rise": rise,
            "proxy_drop_after": drop}


# ----------------------------------------------------------------------------------------------------
# the experiment


@dataclass
class RegimeCurve:
    """One regime's record: metrics at the evaluated ``steps`` (0 = the initial student), the training
    loss of every step (``train_steps``/``train_loss``), and the verdicts."""

    regime: str
    steps: list[int] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    golden: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    sequences_seen: int = 0
    distinct_sequences: int = 0
    seconds: float = 0.0
    label: dict[str, Any] = field(default_factory=dict)
    proxy_deviation: Deviation | None = None
    golden_deviation: Deviation | None = None
    loss_deviation: Deviation | None = None

    @property
    def detected(self) -> bool:
        """The paper's oracle-free signal: the proxy deviates from its early polynomial convergence law."""
        return bool(self.proxy_deviation and self.proxy_deviation.flagged)

    @property
    def hacking(self) -> bool:
        return bool(self.label.get("hacking"))


@dataclass
class HackingResults:
    """``curves[regime]``; ``teacher_golden`` = the golden metric of the teacher itself (its distance to
    the oracle on the same held-out sequences), the floor a perfect copy of the teacher would reach;
    ``init_golden``/``init_proxy`` = the initial student's metrics."""

    config: HackingConfig
    curves: dict[str, RegimeCurve]
    teacher_golden: float
    init_golden: float
    init_proxy: float
    seconds: float

    def rows(self) -> list[dict[str, Any]]:
        """One row per regime and evaluated step: ``regime, step, proxy, golden, train_loss`` (the training
        loss of that step's update; empty at step 0)."""
        out = []
        for c in self.curves.values():
            loss = dict(zip(c.train_steps, c.train_loss))
            for t, p, g in zip(c.steps, c.proxy, c.golden):
                out.append({"regime": c.regime, "step": t, "proxy": p, "golden": g, "train_loss": loss.get(t, "")})
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One row per regime: final and best metrics, the hacking label and the detection signal."""
        out = []
        for c in self.curves.values():
            dev = c.proxy_deviation
            out.append({
                "regime": c.regime, "final_proxy": c.proxy[-1], "final_golden": c.golden[-1],
                "min_golden": min(c.golden), "golden_min_step": c.label.get("golden_min_step"),
                "golden_rise": c.label.get("golden_rise"), "hacking": c.hacking, "detected": c.detected,
                "onset": dev.onset if dev else None, "proxy_exponent": dev.fit.b if dev else None,
                "proxy_max_deviation": dev.max_residual if dev else None,
                "golden_deviation_onset": c.golden_deviation.onset if c.golden_deviation else None,
                "distinct_sequences": c.distinct_sequences, "seconds": c.seconds,
            })
        return out


Target = Callable[[dict[str, Tensor]], Tensor]


def _train_steps(model: nn.Module, batches: Callable[[int], list[Example]], target: Target | None, steps: int,
                 lr: float, vocab: SyntheticVocab, kind: str,
                 after: Callable[[int, list[Example], float], None] | None = None) -> None:
    """``steps`` Adam updates of ``model`` on ``batches(step)`` (step = 1..steps): the token divergence
    ``kind`` to the ``target`` logits, or cross-entropy on the sampled tokens (SFT) when ``target`` is
    None; ``after(step, examples, loss)`` after each update."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(1, steps + 1):
        examples = batches(step)
        b = _batch(examples, vocab.pad_token_id)
        s = token_logits(model, b, len(vocab))
        if target is None:
            loss = token_cross_entropy(s, b["labels"])
        else:
            with torch.no_grad():
                t = target(b)
            loss = token_divergence(s, t, b["labels"], kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after(step, examples, float(loss.detach()))


def _oracle_sequences(oracle: nn.Module, cfg: HackingConfig, vocab: SyntheticVocab, n: int) -> list[Example]:
    """Fresh oracle samples of ``prompt_len + completion_len`` tokens after ``bos``, every token supervised."""
    r = rollout(oracle, [[vocab.bos_token_id]], max_new_tokens=cfg.prompt_len + cfg.completion_len,
                eos_id=vocab.eos_token_id, pad_id=vocab.pad_token_id, temperature=cfg.temperature, num_samples=n)
    return r.examples()


def _models(cfg: HackingConfig, vocab: SyntheticVocab) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Oracle, teacher (distilled from the oracle) and initial student (SFT on oracle samples)."""
    oracle = build_oracle(vocab, cfg.oracle_hidden, cfg.oracle_layers, cfg.heads, init_scale=cfg.oracle_init_scale,
                          sharpness=cfg.oracle_sharpness, seed=cfg.seed)
    v = len(vocab)
    teacher = tiny_causal_lm(None, cfg.teacher_hidden, cfg.teacher_layers, cfg.heads, vocab, seed=cfg.seed + 11)
    sharpened_oracle = lambda b: token_logits(oracle, b, v) / cfg.teacher_temperature  # noqa: E731
    _train_steps(teacher, lambda _: _oracle_sequences(oracle, cfg, vocab, cfg.batch_size), sharpened_oracle,
                 cfg.teacher_steps, cfg.teacher_lr, vocab, "forward_kl")
    teacher.eval().requires_grad_(False)
    student = tiny_causal_lm(None, cfg.student_hidden, cfg.student_layers, cfg.heads, vocab, seed=cfg.seed + 22)
    _train_steps(student, lambda _: _oracle_sequences(oracle, cfg, vocab, cfg.batch_size), None,
                 cfg.student_init_steps, cfg.lr, vocab, "forward_kl")
    return oracle, teacher, student


def run_hacking(config: HackingConfig | None = None, progress: Callable[[str], None] | None = None) -> HackingResults:
    """Build the oracle, teacher and initial student of ``config``, then distill one copy of the student per
    regime for ``config.steps`` updates, recording the proxy and golden metrics, the training loss, the
    hacking label and the detection signals (module docstring). Deterministic on CPU for a seed; every
    regime starts from the same student and the same torch RNG state."""
    cfg = config or HackingConfig()
    say = progress or (lambda _: None)
    start = time.perf_counter()
    vocab = SyntheticVocab(cfg.vocab)
    v = len(vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        oracle, teacher, student0 = _models(cfg, vocab)
        train_prompts = _sample_prompts(oracle, cfg.num_prompts, cfg, vocab)
        eval_prompts = _sample_prompts(oracle, cfg.eval_prompts, cfg, vocab)
        golden_batch = _batch(_completions(oracle, eval_prompts, cfg, vocab), vocab.pad_token_id)
        proxy_batch = _batch(_completions(teacher, eval_prompts, cfg, vocab), vocab.pad_token_id)
        with torch.no_grad():
            oracle_ref = token_logits(oracle, golden_batch, v).float()
            teacher_ref = token_logits(teacher, proxy_batch, v).float()
            teacher_golden = float(token_divergence(token_logits(teacher, golden_batch, v).float(), oracle_ref,
                                                    golden_batch["labels"], cfg.metric_kind))
        init_golden = distance(student0, golden_batch, oracle_ref, v, cfg.metric_kind)
        init_proxy = distance(student0, proxy_batch, teacher_ref, v, cfg.metric_kind)
        say(f"teacher golden {teacher_golden:.4f}; initial student proxy {init_proxy:.4f} golden {init_golden:.4f}")
        rng_state = torch.random.get_rng_state()
        curves = {}
        for regime in cfg.regimes:
            torch.random.set_rng_state(rng_state)
            curves[regime] = _run_regime(regime, copy.deepcopy(student0), teacher, train_prompts, golden_batch,
                                         oracle_ref, proxy_batch, teacher_ref, cfg, vocab)
            c = curves[regime]
            say(f"{regime}: proxy {c.proxy[-1]:.4f} golden {c.golden[-1]:.4f} (min {min(c.golden):.4f} at step "
                f"{c.label['golden_min_step']}), hacking {c.hacking}, detected {c.detected} ({c.seconds:.1f} s)")
    return HackingResults(cfg, curves, teacher_golden, init_golden, init_proxy, time.perf_counter() - start)


def _run_regime(regime: str, student: nn.Module, teacher: nn.Module, prompts: list[list[int]],
                golden_batch: dict[str, Tensor], oracle_ref: Tensor, proxy_batch: dict[str, Tensor],
                teacher_ref: Tensor, cfg: HackingConfig, vocab: SyntheticVocab) -> RegimeCurve:
    start = time.perf_counter()
    v = len(vocab)
    source = make_source(regime, prompts, teacher, cfg, vocab)
    curve = RegimeCurve(regime)
    seen: set[tuple[int, ...]] = set()

    def evaluate(step: int) -> None:
        curve.steps.append(step)
        curve.proxy.append(distance(student, proxy_batch, teacher_ref, v, cfg.metric_kind))
        curve.golden.append(distance(student, golden_batch, oracle_ref, v, cfg.metric_kind))

    def record(step: int, examples: list[Example], loss: float) -> None:
        seen.update(tuple(e.input_ids) for e in examples)
        curve.sequences_seen += len(examples)
        curve.train_steps.append(step)
        curve.train_loss.append(loss)
        if step <= 2 * cfg.eval_every or step % cfg.eval_every == 0 or step == cfg.steps:  # dense early: log-log
            evaluate(step)

    evaluate(0)
    _train_steps(student, lambda step: source.batch(step, student), lambda b: token_logits(teacher, b, v), cfg.steps,
                 cfg.lr, vocab, cfg.kind, record)
    curve.distinct_sequences = len(seen)
    curve.seconds = time.perf_counter() - start
    dev = dict(fit_range=cfg.fit_range, tolerance=cfg.tolerance, smooth=cfg.smooth)
    curve.label = hacking_label(curve.steps[1:], curve.proxy[1:], curve.golden[1:], cfg.margin, cfg.smooth)
    curve.proxy_deviation = convergence_deviation(curve.steps, curve.proxy, **dev)
    curve.golden_deviation = convergence_deviation(curve.steps, curve.golden, **dev)
    curve.loss_deviation = convergence_deviation(curve.train_steps, curve.train_loss, **dev)
    return curve


# ----------------------------------------------------------------------------------------------------
# outputs


_COLORS = {"offline": "tab:orange", "online_student": "tab:blue", "online_teacher": "tab:green",
           "multi_gen": "tab:purple"}


def plot(results: HackingResults, path: str | Path) -> Path:
    """Three panels: proxy and golden metrics against steps in log-log scale, one colour per regime, each
    with its early power law (dashed, fitted on the shaded window and extrapolated) and the detected onset
    (marker); and the proxy-golden plot (the paper's Fig. 4: a U shape is teacher hacking)."""
    from distill.core.report import pyplot

    plt = pyplot()
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for c in results.curves.values():
        color = _COLORS.get(c.regime, None)
        for ax, ys, dev in ((axes[0], c.proxy, c.proxy_deviation), (axes[1], c.golden, c.golden_deviation)):
            xs = [t for t in c.steps if t > 0]
            ys = [y for t, y in zip(c.steps, ys) if t > 0]
            ax.plot(xs, ys, color=color, label=c.regime, lw=1.2)
            if dev is not None:
                ax.plot(xs, [dev.fit(t) for t in xs], color=color, ls="--", lw=0.9, alpha=0.8)
                if dev.onset is not None:
                    ax.plot([dev.onset], [ys[xs.index(dev.onset)]], marker="o", color=color, ms=7, mfc="none")
        axes[2].plot(c.proxy[1:], c.golden[1:], color=color, label=c.regime, lw=1.0, marker=".", ms=2)
    for ax, title in ((axes[0], "proxy: KL(teacher ‖ student)"), (axes[1], "golden: KL(oracle ‖ student)")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_title(title)
    axes[1].axhline(results.teacher_golden, color="gray", ls=":", lw=1, label="teacher's golden")
    first = next(iter(results.curves.values()))
    if first.proxy_deviation is not None:
        for ax in axes[:2]:
            ax.axvspan(first.proxy_deviation.fit_start, first.proxy_deviation.fit_end, color="gray", alpha=0.08)
    axes[2].set_xscale("log"), axes[2].set_xlabel("proxy (log)"), axes[2].set_ylabel("golden")
    axes[2].set_title("proxy-golden (U shape = teacher hacking)")
    axes[0].legend(fontsize=8), axes[1].legend(fontsize=8)
    fig.suptitle("Teacher hacking (S21): dashed = power law fitted on the shaded window; o = detected onset",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def markdown(results: HackingResults) -> str:
    """The summary: per regime, the metrics, whether hacking happened (oracle) and was detected (no oracle)."""
    cfg = results.config
    lines = [
        "# Teacher hacking (S21)",
        "",
        f"Oracle → teacher → student on a synthetic vocabulary of {cfg.vocab} tokens; {cfg.steps} student updates of "
        f"{cfg.batch_size} sequences per regime; {cfg.num_prompts} training prompts, {cfg.eval_prompts} held-out "
        f"prompts; training loss `{cfg.kind}`, metrics `{cfg.metric_kind}` per token; seed {cfg.seed}.",
        "",
        f"Teacher's own golden metric (distance to the oracle): {results.teacher_golden:.4f}. Initial student: "
        f"proxy {results.init_proxy:.4f}, golden {results.init_golden:.4f}.",
        "",
        "| regime | distinct sequences | final proxy | min golden (step) | final golden | golden rise | "
        "hacking (oracle) | detected (no oracle) | onset | proxy exponent b |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results.summary():
        rise = s["golden_rise"]
        lines.append(
            f"| {s['regime']} | {s['distinct_sequences']} | {s['final_proxy']:.4f} | {s['min_golden']:.4f} "
            f"({s['golden_min_step']}) | {s['final_golden']:.4f} | {100 * rise:+.1f} % | {_fmt(s['hacking'])} | "
            f"{_fmt(s['detected'])} | {_fmt(s['onset'])} | {_fmt(s['proxy_exponent'])} |"
        )
    lines += [
        "",
        f"*Hacking (oracle)*: the smoothed golden metric ends more than {100 * cfg.margin:.0f} % above its minimum "
        "while the proxy kept falling after that minimum (the paper's definition). *Detected (no oracle)*: the "
        f"proxy's smoothed log-residual to the power law `a·t^(−b)` fitted on steps {cfg.fit_range[0]:.0%}–"
        f"{cfg.fit_range[1]:.0%} of the run stays above {cfg.tolerance} from the onset step to the end, over at least "
        f"{cfg.smooth} evaluations (the paper's deviation from polynomial convergence). Golden rise: smoothed golden "
        "at the end over its smoothed minimum.",
        "",
        f"Total time {results.seconds:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(results: HackingResults, out: str | Path) -> dict[str, Path]:
    """``hacking.png`` (:func:`plot`), ``hacking.csv`` (:meth:`HackingResults.rows`) and ``hacking.md``
    (:func:`markdown`) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "hacking.png", "csv": out / "hacking.csv", "md": out / "hacking.md"}
    plot(results, paths["png"])
    rows = results.rows()
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["regime", "step", "proxy", "golden", "train_loss"])
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(markdown(results))
    return paths




