"""DisWOT (S59, Dong, Li & Wei, CVPR 2023, "DisWOT: Student Architecture Search for Distillation
WithOut Training"): rank candidate students for a teacher without training any of them.

The score, as the official ``exps/parse_nb201_distill.py :: compute_diswot_procedure``
(lliai/DisWOT-CVPR2023) computes it for each candidate:

1. teacher and candidate are **randomly initialised** (``network_weight_gaussian_init``: conv and
   linear weights ``N(0, 1)``, biases 0, norm layers 1/0; :func:`gaussian_init_`), in train mode;
2. one batch ``(x, y)``: the pooled last features ``f`` (the official ``forward_with_features()[-1]``,
   our classifiers' ``embed(x)``) and the logits; one cross-entropy backward each;
3. relation similarity: ``SP(f_T, f_S)`` (``distiller_zoo/SP.py``, Tung & Mori's batch Gram
   distance; ``distill.features.losses.sp_loss`` is exactly it);
4. semantic similarity: ``ICKD(g_T, g_S)`` (``distiller_zoo/ICKD.py``) of the classifier's weight
   gradients ``g = fc.weight.grad`` ``[classes, features]``, the paper's "Grad-CAM of the fc layer":
   per class ``k`` the outer product ``g_k g_kᵀ`` row-normalised, squared distance summed and divided
   by ``classes · features`` (:func:`ickd_loss`);
5. ``score = −SP − ICKD``: higher = more similar to the teacher = predicted better after KD.

Ours / deviations:

- ICKD needs equal feature widths (``[classes, C, C]`` matrices); NAS-Bench-201 cells all end in 64
  channels, our candidates do not. When any candidate's width differs from the teacher's, the semantic
  term of *every* candidate is the width-free class-relation distance ``SP(g_T, g_S)`` (the ``[classes,
  classes]`` Gram of the gradient rows, :func:`semantic_similarity` with ``kind="class"``) so one ranking
  uses one measure; the report says which was used.
- One fixed batch for every candidate (the official loop draws the next batch per candidate), and the
  teacher's gradients are zeroed per candidate (the official loop never zeroes them: they accumulate).
- Our archs' 1-D convs and BatchNorm1d get the same Gaussian init as the official 2-D ones.
- The search itself (the paper's evolutionary algorithm) is not reproduced: we rank a given set of
  candidates and, with ``train``, check the ranking against their accuracy after Hinton KD (``kd``)
  by Spearman's ρ and Kendall's τ-b, next to two baselines (parameter count, and each term alone).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from distill.core.rundir import tool_output
from distill.errors import MismatchError, MissingFileError, RecipeError
from distill.features.losses import sp_loss

Semantic = Literal["auto", "ickd", "class"]


# --- the score ------------------------------------------------------------------------------------

def gaussian_init_(model: nn.Module) -> nn.Module:
    """The official ``network_weight_gaussian_init``: conv/linear weights ``N(0, 1)`` and biases 0,
    norm-layer weights 1 and biases 0 (in place, no grad). Other parameters (a ViT's position
    embeddings) keep their own init."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
    return model


def ickd_loss(g_s: Tensor, g_t: Tensor) -> Tensor:
    """The official ``ICKDLoss.batch_loss`` on ``[n, C]`` (or ``[n, C, ...]``) inputs: per row ``i`` the
    ``C×C`` matrix ``g_i g_iᵀ`` (``[n, C, HW]`` maps: ``g_i g_iᵀ`` over positions), each of its rows
    L2-normalised; ``Σ (E_S − E_T)² / (C · n)``. Student and teacher shapes must match."""
    if g_s.shape != g_t.shape:
        raise MismatchError(f"ickd_loss: student {tuple(g_s.shape)} and teacher {tuple(g_t.shape)} differ")
    n, c = g_s.shape[0], g_s.shape[1]

    def emb(g: Tensor) -> Tensor:
        g = g.float().reshape(n, c, -1)
        return F.normalize(torch.bmm(g, g.transpose(1, 2)), dim=2)

    return (emb(g_s) - emb(g_t)).pow(2).sum() / (c * n)


def semantic_similarity(g_s: Tensor, g_t: Tensor, kind: Literal["ickd", "class"]) -> Tensor:
    """The semantic distance of two classifier-weight gradients ``[classes, features]``: the official
    ICKD (equal widths) or, ours for unequal widths, ``sp_loss`` over the classes (rows)."""
    return ickd_loss(g_s, g_t) if kind == "ickd" else sp_loss(g_s, g_t)


@dataclass
class Score:
    relation: float  # SP distance of the pooled features
    semantic: float  # ICKD (or class-relation) distance of the fc gradients
    score: float  # −relation − semantic


def _features_and_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    model.zero_grad(set_to_none=True)
    f = model.embed(x)
    F.cross_entropy(model.head(f), y).backward()
    return f.detach(), model.head.weight.grad.detach().clone()


def diswot_score(teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor,
                 semantic: Literal["ickd", "class"] = "ickd") -> Score:
    """``−SP(f_T, f_S) − ICKD(∇W_T, ∇W_S)`` of two classifiers (``embed`` + ``head``) on one labeled batch,
    after one cross-entropy backward each (``compute_diswot_procedure``). Models are used as given
    (initialise them with :func:`gaussian_init_` first, as the paper does); their ``.grad`` are overwritten."""
    for who, m in (("teacher", teacher), ("student", student)):
        if not callable(getattr(m, "embed", None)) or not isinstance(getattr(m, "head", None), nn.Linear):
            raise MismatchError(f"DisWOT needs a classifier with embed() and a Linear head; the {who} "
                                f"({type(m).__name__}) has not")
    ft, gt = _features_and_grad(teacher, x, y)
    fs, gs = _features_and_grad(student, x, y)
    rel = float(sp_loss(fs, ft))
    sem = float(semantic_similarity(gs, gt, semantic))
    return Score(rel, sem, -rel - sem)


# --- rank correlation -----------------------------------------------------------------------------

def rank(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the (average-tie) ranks."""
    return _pearson(rank(a), rank(b))


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's τ-b (ties in either list handled as scipy's ``kendalltau`` does)."""
    conc = disc = ta = tb = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    den = math.sqrt((conc + disc + ta) * (conc + disc + tb))
    return (conc - disc) / den if den > 0 else float("nan")


# --- candidates -----------------------------------------------------------------------------------

# our built-in sets. ``grid``: three families (CNN, MLP, ViT) at two widths and two depths each
# (94 to 26k parameters on digits: size varies); ``budget``: ten students of 2.7k-6.5k parameters on
# digits (the paper's use, a search under one budget)
BUILTIN: dict[str, list[dict[str, Any]]] = {
    "grid": [{"arch": "convnet", "width": w, "depth": d} for w in (4, 16) for d in (1, 3)]
    + [{"arch": "mlpnet", "width": w, "depth": d} for w in (16, 128) for d in (1, 2)]
    + [{"arch": "vit", "hidden": h, "depth": d, "heads": 2, "patch": 2} for h in (16, 32) for d in (1, 2)],
    "budget": [{"arch": "convnet", "width": w, "depth": d} for w, d in ((12, 2), (6, 3), (8, 3), (4, 4))]
    + [{"arch": "mlpnet", "width": w, "depth": d} for w, d in ((64, 1), (32, 3), (24, 4))]
    + [{"arch": "vit", "hidden": h, "depth": d, "heads": 2, "patch": 2} for h, d in ((24, 1), (16, 2), (8, 4))],
}
_SHORT = {"width": "w", "depth": "d", "hidden": "h", "heads": "nh", "patch": "p", "growth": "g", "mlp_ratio": "r"}


def candidate_label(spec: dict[str, Any]) -> str:
    """``label``, else the arch and its parameters: ``convnet-w8-d3``."""
    parts = [f"{_SHORT.get(k, k)}{v}" for k, v in spec.items() if k not in ("arch", "label")]
    return str(spec.get("label") or "-".join([spec["arch"], *parts]))


def load_candidates(source: str) -> list[dict[str, Any]]:
    """A built-in set (``grid``, ``budget``: :data:`BUILTIN`) or a YAML file: a list of ``{arch: ...,
    <params>, label: ...}`` (or a mapping with that list under ``candidates``)."""
    if source in BUILTIN:
        cands = [dict(c) for c in BUILTIN[source]]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise MissingFileError(f"--candidates {source}: no such file (give a YAML list, or one of {', '.join(BUILTIN)})")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"--candidates {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        cands = data.get("candidates") if isinstance(data, dict) else data
        if not isinstance(cands, list) or not all(isinstance(c, dict) and "arch" in c for c in cands):
            raise RecipeError(f"--candidates {path}: expected a list of mappings with 'arch' (and its parameters)")
    labels = [candidate_label(c) for c in cands]
    if len(set(labels)) != len(labels):
        raise RecipeError("--candidates: two candidates have the same label; give them distinct 'label's")
    if len(cands) < 2:
        raise RecipeError("--candidates: rank at least two candidates")
    return cands


# --- the search -----------------------------------------------------------------------------------

@dataclass
class Row:
    label: str
    spec: dict[str, Any]
    params: int
    relation: float
    semantic: float
    score: float
    rank: int = 0  # by score, 1 = best
    accuracy: float | None = None  # test accuracy after KD (with train)
    run: str | None = None


@dataclass
class SearchResult:
    teacher: str
    task: str
    semantic: str
    batch_size: int
    seed: int
    rows: list[Row]
    correlations: dict[str, dict[str, float]] = field(default_factory=dict)  # proxy -> {spearman, kendall}


def _teacher_recipe(teacher: str, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """The teacher's recipe and the reference a KD recipe gives it: a run folder (its recipe.yaml) or a
    recipe (name or file, trained once into ``<runs>/_teachers`` when a candidate needs it)."""
    from distill.core.recipe import flat_sections, load_recipe, recipe_from_dict

    p = Path(teacher).expanduser()
    if p.is_dir():
        if not (p / "recipe.yaml").is_file():
            raise MissingFileError(f"{p} is not a run folder (no recipe.yaml); give a run folder or a teacher recipe")
        r = recipe_from_dict(yaml.safe_load((p / "recipe.yaml").read_text()), base_dir=p)
        return r, {"run": str(p.resolve())}
    r = load_recipe(teacher, overrides)
    return r, {"recipe": flat_sections(r.resolved())}


def _batch(data: Any, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``size`` labeled training samples, drawn once with ``seed`` (the same batch for every candidate)."""
    x, y = data.train.x, data.train.y
    keep = torch.nonzero(y >= 0).flatten()
    g = torch.Generator().manual_seed(seed)
    idx = keep[torch.randperm(len(keep), generator=g)[:size]]
    return x[idx], y[idx]


def score_candidates(teacher_model: nn.Module, build: Callable[[dict[str, Any]], nn.Module],
                     cands: list[dict[str, Any]], x: Tensor, y: Tensor, seed: int,
                     semantic: Semantic = "auto") -> tuple[list[Row], str]:
    """Score every candidate against ``teacher_model`` (initialised here with :func:`gaussian_init_`,
    seed ``seed``; each candidate with ``seed + 1 + i``). Returns the rows ranked (1 = best) and the
    semantic measure used."""
    torch.manual_seed(seed)
    gaussian_init_(teacher_model).train()
    models = []
    for i, c in enumerate(cands):
        torch.manual_seed(seed + 1 + i)
        params = {k: v for k, v in c.items() if k not in ("arch", "label")}
        models.append(gaussian_init_(build({"name": c["arch"], "params": params})).train())
    if semantic == "auto":
        width = teacher_model.head.in_features
        semantic = "ickd" if all(m.head.in_features == width for m in models) else "class"
    rows = []
    for c, m in zip(cands, models):
        s = diswot_score(teacher_model, m, x, y, semantic)
        if not math.isfinite(s.score):
            raise MismatchError(f"DisWOT score of {candidate_label(c)} is not finite (activations overflow at "
                                "N(0, 1) init); use a shallower candidate")
        rows.append(Row(candidate_label(c), c, sum(p.numel() for p in m.parameters()), s.relation, s.semantic, s.score))
    for r_, row in zip(rank([-r.score for r in rows]), rows):
        row.rank = int(r_)
    return rows, semantic


def kd_recipe(name: str, task: dict[str, Any], cand: dict[str, Any], teacher_ref: dict[str, Any], seed: int,
              overrides: list[str]) -> Any:
    """The recipe that distils ``cand`` from the teacher with Hinton KD (our short budget; ``overrides``
    as ``--set`` keys, e.g. ``train.epochs=30``)."""
    from distill.core.recipe import apply_overrides, recipe_from_dict

    data = {"name": name, "seed": seed, "task": task,
            "student": {k: v for k, v in cand.items() if k != "label"}, "teacher": teacher_ref,
            "method": {"name": "kd"},
            "train": {"epochs": 15, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0001,
                      "trackers": "none", "progress": False}}
    return recipe_from_dict(apply_overrides(data, overrides, cwd=Path.cwd()))


def search_students(teacher: str, candidates: str, *, train: bool = False, runs: Path = Path("runs"),
                    name: str = "diswot", batch_size: int = 64, seed: int = 0, semantic: Semantic = "auto",
                    teacher_set: list[str] | None = None, train_set: list[str] | None = None,
                    progress: Callable[[str], None] | None = None) -> SearchResult:
    """Rank ``candidates`` (``grid`` or a YAML file) for ``teacher`` (a teacher recipe or run folder) by
    the DisWOT score; with ``train``, distil each with ``kd`` (runs ``<runs>/<name>-<label>``, teacher
    recipes trained once in ``<runs>/_teachers``) and correlate the score with the test accuracy."""
    from distill.core.recipe import flat_sections
    from distill.core.registry import ARCHS
    from distill.core.runner import build_task, run_recipe, student_spec
    from distill.core.taskops import task_ops
    from distill.core.rundir import check_run_name

    say = progress or (lambda m: None)
    check_run_name(name, "--name")
    cands = load_candidates(candidates)
    t_recipe, t_ref = _teacher_recipe(teacher, teacher_set or [])
    arch = t_recipe.student.name if t_recipe.student is not None else None
    if arch in ARCHS and getattr(ARCHS.get(arch).obj, "family", None) == "lm":
        raise RecipeError(f"the teacher ({arch}) is a language model: DisWOT ranks classifiers")
    data = build_task(t_recipe)
    if not hasattr(data, "num_classes") or not hasattr(getattr(data, "train", None), "y"):
        raise RecipeError(f"task '{t_recipe.task.name}' is not a classifier task: DisWOT ranks classifiers")
    ops = task_ops(data)
    x, y = _batch(data, batch_size, seed)
    rows, used = score_candidates(ops.build_model(student_spec(t_recipe, data)), ops.build_model, cands, x, y,
                                  seed, semantic)
    res = SearchResult(str(teacher), t_recipe.task.name, used, len(x), seed, rows)
    if train:
        task = flat_sections(t_recipe.resolved())["task"]
        for row in rows:
            r = kd_recipe(f"{name}-{row.label}", task, row.spec, t_ref, seed, train_set or [])
            say(f"  distilling {row.label} ({row.params} parameters)")
            out = run_recipe(r, out=runs, progress=False)
            row.accuracy, row.run = float(out.metrics["test/accuracy"]), str(out.run_dir)
        acc = [r.accuracy for r in rows]
        proxies = {"diswot": [r.score for r in rows], "relation (−SP)": [-r.relation for r in rows],
                   "semantic (−ICKD)": [-r.semantic for r in rows], "parameters": [float(r.params) for r in rows]}
        res.correlations = {k: {"spearman": spearman(v, acc), "kendall": kendall_tau(v, acc)} for k, v in proxies.items()}
    return res


# --- outputs --------------------------------------------------------------------------------------

MARKER = "diswot.json"


def markdown(res: SearchResult) -> str:
    sem = "ICKD of the fc gradients" if res.semantic == "ickd" else "class-relation SP of the fc gradients (widths differ)"
    lines = ["# DisWOT student ranking (S59)", "",
             f"Teacher `{res.teacher}` on `{res.task}`; one batch of {res.batch_size}, seed {res.seed}; "
             f"score = −SP(features) − semantic, semantic = {sem}. Higher = predicted better after KD.", "",
             "| rank | candidate | parameters | −SP | −semantic | score | KD test accuracy |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(res.rows, key=lambda r: r.rank):
        acc = f"{100 * r.accuracy:.2f} %" if r.accuracy is not None else "—"
        lines.append(f"| {r.rank} | {r.label} | {r.params} | {-r.relation:.4g} | {-r.semantic:.4g} | {r.score:.4g} | {acc} |")
    if res.correlations:
        lines += ["", "Rank correlation with the accuracy after KD:", "", "| proxy | Spearman ρ | Kendall τ-b |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v['spearman']:.3f} | {v['kendall']:.3f} |" for k, v in res.correlations.items()]
    return "\n".join(lines) + "\n"


def plot(res: SearchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = [r for r in res.rows if r.accuracy is not None]
    for r in rows:
        ax.scatter(r.score, 100 * r.accuracy, color=f"C{['convnet', 'mlpnet', 'vit'].index(r.spec['arch']) if r.spec['arch'] in ('convnet', 'mlpnet', 'vit') else 3}")
        ax.annotate(r.label, (r.score, 100 * r.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    c = res.correlations.get("diswot", {})
    ax.set_title(f"DisWOT score vs accuracy after KD (ρ = {c.get('spearman', float('nan')):.2f}, "
                 f"τ = {c.get('kendall', float('nan')):.2f})", fontsize=9)
    ax.set_xlabel("DisWOT score (at initialisation, one batch)")
    ax.set_ylabel("test accuracy after KD (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(res: SearchResult, out: Path, overwrite: bool = False) -> Path:
    """``out``/diswot.csv, diswot.md, diswot.json and (when trained) diswot.png, by ``core.rundir.tool_output``."""
    with tool_output(out, MARKER, overwrite) as folder:
        cols = ["rank", "label", "params", "relation", "semantic", "score", "accuracy", "run"]
        with open(folder / "diswot.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(asdict(r) for r in sorted(res.rows, key=lambda r: r.rank))
        (folder / "diswot.md").write_text(markdown(res))
        if any(r.accuracy is not None for r in res.rows):
            plot(res, folder / "diswot.png")
        (folder / MARKER).write_text(json.dumps(asdict(res), indent=2, default=str))
    return Path(out).expanduser()
