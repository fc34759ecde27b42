"""``phased_dmd``: Phased DMD (S17, arXiv 2510.27684; no official code, the abstract only).

The paper's two ideas, as we read the abstract: the SNR range is split into sub-intervals (phases),
each with its own expert (a mixture of experts), refined progressively towards high SNR; and the
distribution matching of each phase is score matching within that phase's sub-interval. Ours:

- the phases are the student sampler's steps: edges t_0 = t_max > … > t_K = 0 (K = ``steps``, the
  consistency sampler's grid), phase k the times t_{k+1} < t ≤ t_k, decided by log-SNR
  (``dmd_parts.phase_index``), so the expert of phase k is the one the sampler calls at step k;
- the student is ``PhasedExperts``: K copies of the teacher-initialised denoiser, routed per sample;
- a phase-k sample is the experts' chain (no gradient) from noise to x_{t_k}, then expert k's x̂₀
  (DMD2's backward simulation); its DMD loss re-noises only inside the phase, τ ~ U(t_{k+1}, t_k)
  (clipped to [t_min, t_max]): above t_k the input fixes the distribution, below t_{k+1} the later
  experts act. The one critic is trained on each phase's samples at that phase's τ, so at every τ it
  models the distribution of the expert whose phase holds τ;
- ``progressive``: phase k is trained in the k-th K-th of the run (low SNR first), else every
  phase at every generator step (uniformly drawn per sample).

The student is saved as the registered arch ``phased_experts`` (the base arch and its params, the
number of phases and t_max), so ``load_denoiser`` and ``teacher: {run: ...}`` rebuild it.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, METHODS
from distill.diffusion.dmd_parts import phase_index, phase_times
from distill.diffusion.methods.dmd import DMD, DMDParams
from distill.diffusion.models import DenoiserParams, build_denoiser, diffusion_spec
from distill.diffusion.schedules import Schedule, get_schedule


class PhasedExperts(nn.Module):
    """One denoiser per phase; each sample goes to the expert of its time's phase (by log-SNR)."""

    def __init__(self, base: nn.Module, edges: Tensor) -> None:
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(base) for _ in range(len(edges) - 1))
        self.register_buffer("edges", edges.clone())
        self.diffusion = dict(diffusion_spec(base))
        self.sched: Schedule = get_schedule(self.diffusion["schedule"])

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        idx = phase_index(t, self.edges, self.sched)
        out = torch.zeros_like(x)
        for k, expert in enumerate(self.experts):
            m = idx == k
            if m.any():
                args = (x[m], t[m], None if cond is None else cond[m])
                out[m] = expert(*args) if w is None else expert(*args, w[m])
        return out


class PhasedExpertsParams(DenoiserParams):
    base_arch: str = Field(..., description="each expert's arch (a denoiser)")
    base_params: dict = Field(default_factory=dict, description="the experts' arch params")
    phases: int = Field(..., ge=1, description="experts, one per phase")
    t_max: float = Field(1.0, gt=0, le=1, description="the first phase's upper time")


@ARCHS.register("phased_experts", "one denoiser per SNR phase, routed by time (a phased_dmd student)",
                PhasedExpertsParams)
def phased_experts(p: PhasedExpertsParams, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    base = build_denoiser(p.base_arch, p.base_params, shape, num_classes)
    return PhasedExperts(base, phase_times(p.phases, p.t_max))


phased_experts.family = "diffusion"  # type: ignore[attr-defined]


class PhasedParams(DMDParams):
    steps: int = Field(2, ge=1, description="the student's sampling steps = the number of phases (experts)")
    progressive: bool = Field(False, description="train the phases one after another (low SNR first)")


@METHODS.register("phased_dmd", "Phased DMD (S17): SNR phases with one expert each, DMD within each phase",
                  PhasedParams)
class PhasedDMD(DMD):
    def __init__(self, student, teacher, params: PhasedParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.student = PhasedExperts(student, phase_times(params.steps, float(self.times[0])))

    def export_spec(self, spec):
        if spec is None:
            return None  # a custom base module: saved with its weights only
        base = diffusion_spec(self.student)
        return {"name": "phased_experts", "params": {
            "base_arch": spec["name"], "base_params": spec["params"], "phases": self.params.steps,
            "t_max": float(self.times[0]), "schedule": base["schedule"], "prediction": base["prediction"]}}

    def draw_steps(self, n: int, device) -> Tensor:
        if not self.params.progressive or not self.total_steps:
            return super().draw_steps(n, device)
        k = min(int(self.updates) * self.params.steps // self.total_steps, self.params.steps - 1)
        return torch.full((n,), k, dtype=torch.long, device=device)

    def phase_range(self, k: Tensor) -> tuple[Tensor, Tensor]:
        p, edges = self.params, self.student.edges.to(k.device)
        lo = edges[k + 1].clamp(p.t_min, p.t_max)
        hi = edges[k].clamp(p.t_min, p.t_max)
        return lo, hi

    def dmd_times(self, t_in: Tensor, k: Tensor) -> Tensor:
        lo, hi = self.phase_range(k)
        return lo + (hi - lo) * torch.rand_like(t_in)

    def critic_times(self, t_in: Tensor, k: Tensor) -> Tensor:
        edges = self.student.edges.to(k.device)
        lo, hi = edges[k + 1].clamp_min(self.params.critic_t_min), edges[k].clamp_min(self.params.critic_t_min)
        return lo + (hi - lo) * torch.rand_like(t_in)
