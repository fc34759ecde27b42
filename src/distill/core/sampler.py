"""Training-data samplers: which examples the engine trains on at each optimizer step.

Without ``train.sampler`` the engine draws a fresh permutation of the training set every epoch
(``EpochBatches``). A sampler (``train.sampler: {name: ...}``) replaces it, whatever the method:

- ``indices(step)``: the micro-batches (dataset indices) of optimizer step ``step``, this process's share;
- ``update(step, student, teacher)``: called before the first step (``step`` 0) and after every optimizer
  step (``step`` = steps done); returns metrics to log (as ``sampler/<name>``) or None;
- ``state_dict()`` / ``load_state_dict()``: JSON state, checkpointed with the trainer's state, so a
  resumed run draws exactly the batches the uninterrupted run draws.

``DomainSampler`` (``name: domains``) draws from a mixture over the task's domains (the training set's
``domains``, an id per example, and ``domain_names``; arithmetic: the operation). Steps are grouped in
intervals of ``every`` steps; interval ``t``'s examples are drawn at once from ``(seed, t)`` and the
weights: each example's domain from the weights, then the next example of that domain's permutation,
a new permutation whenever the domain is used up (DDK's "continues cyclically once a domain data has
been exhausted", S48 Sec. 3.2). A domain's permutations restart at each interval, so a step's batches
depend only on (seed, its interval, the interval's weights) and a resume needs no cursor. Every
micro-batch has exactly ``batch_size`` examples; micro-batch ``b`` of a step goes to process ``b mod P``.
DDK (``distill.lm.methods.ddk``) subclasses it and re-weights the domains every interval.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from distill.core.recipe import SamplerConfig
from distill.core.registry import Registry
from distill.errors import RecipeError

SAMPLERS = Registry("sampler")


@runtime_checkable
class Sampler(Protocol):
    def indices(self, step: int) -> list[Tensor]:
        """The micro-batches of optimizer step ``step`` (this process's)."""

    def update(self, step: int, student: nn.Module, teacher: nn.Module | None) -> dict[str, float] | None:
        """Before step 0 and after every optimizer step; metrics to log, or None."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (checkpointed)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` on resume."""


def domains_of(dataset: Any, sampler: str, split: str = "training") -> tuple[Tensor, list[str]]:
    """A split's per-example domain ids and the domain names; a ``RecipeError`` when it has none."""
    ids, names = getattr(dataset, "domains", None), getattr(dataset, "domain_names", None)
    if ids is None or names is None:
        raise RecipeError(f"train.sampler '{sampler}' needs a task whose {split} examples carry domains "
                          "(arithmetic: the operation); this task has none: remove train.sampler")
    return torch.as_tensor(list(ids), dtype=torch.long), list(names)


@SAMPLERS.register("domains", "a fixed mixture over the task's domains (train.sampler.weights)")
class DomainSampler:
    """A mixture over domains with weights ``self.weights`` (``[N]`` float64, summing to 1)."""

    def __init__(self, cfg: SamplerConfig, train_set: Any, distiller: nn.Module, seed: int, batch_size: int,
                 grad_accum: int, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.seed, self.bs, self.accum, self.rank, self.world = cfg, seed, batch_size, grad_accum, rank, world
        self.domains, self.names = domains_of(train_set, cfg.name)
        self.members = [torch.nonzero(self.domains == d).flatten() for d in range(len(self.names))]
        self.weights: Tensor | None = self.initial_weights()
        self._plan: tuple[int, Tensor] | None = None  # (interval, [every · accum · world, batch_size])

    def initial_weights(self) -> Tensor | None:
        given = self.cfg.weights
        if given is None:
            return torch.full((len(self.names),), 1.0 / len(self.names), dtype=torch.float64)
        unknown = sorted(set(given) - set(self.names))
        if unknown:
            raise RecipeError(f"train.sampler.weights: unknown domain(s) {unknown}; this task's domains are {self.names}")
        w = torch.tensor([float(given.get(n, 0.0)) for n in self.names], dtype=torch.float64)
        return w / w.sum()

    # --- the protocol ----------------------------------------------------------------------------
    def indices(self, step: int) -> list[Tensor]:
        t, k = divmod(step, self.cfg.every)
        if self._plan is None or self._plan[0] != t:
            self._plan = (t, self.draw(t))
        per_step = self.accum * self.world
        rows = self._plan[1][k * per_step : (k + 1) * per_step]
        return list(rows[self.rank :: self.world])

    def update(self, step: int, student: nn.Module, teacher: nn.Module | None) -> dict[str, float] | None:
        return self.logged() if step == 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" in state:
            w = state["weights"]
            self.weights = None if w is None else torch.tensor(w, dtype=torch.float64)
        self._plan = None

    # --- drawing ---------------------------------------------------------------------------------
    def set_weights(self, weights: Tensor) -> None:
        self.weights = weights.to(torch.float64)
        self._plan = None

    def logged(self) -> dict[str, float]:
        assert self.weights is not None
        return {f"weight/{n}": float(w) for n, w in zip(self.names, self.weights)}

    def draw(self, t: int) -> Tensor:
        """Interval ``t``'s micro-batches, every process's: ``[every · grad_accum · world, batch_size]``."""
        if self.weights is None:
            raise RuntimeError("the sampler has no weights yet: call update(0, ...) before the first step")
        w = self.weights.clone()
        empty = [d for d, m in enumerate(self.members) if len(m) == 0]
        w[empty] = 0.0  # a domain with no training example cannot be drawn
        if float(w.sum()) <= 0:
            raise RecipeError(f"train.sampler: every weighted domain has no training example (domains {self.names})")
        n = self.cfg.every * self.accum * self.world * self.bs
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 500_009 * (t + 1))
        dom = torch.multinomial(w, n, replacement=True, generator=g)
        out = torch.empty(n, dtype=torch.long)
        for d, m in enumerate(self.members):
            where = dom == d
            count = int(where.sum())
            if count:
                cycles = -(-count // len(m))
                out[where] = torch.cat([m[torch.randperm(len(m), generator=g)] for _ in range(cycles)])[:count]
        return out.view(-1, self.bs)


def make_sampler(cfg: SamplerConfig, train_set: Any, distiller: nn.Module, seed: int, batch_size: int,
                 grad_accum: int, rank: int = 0, world: int = 1) -> Sampler:
    """The registered sampler ``cfg.name`` (``domains`` here, ``ddk`` in ``distill.lm.methods.ddk``)."""
    return SAMPLERS.get(cfg.name).obj(cfg, train_set, distiller, seed, batch_size, grad_accum, rank, world)
