"""The papers that docstrings, recipes and the README cite by id, and the paper of every method.

Ids: ``S01``–``S60`` number the papers of the project's seed listing in its order (the catalogue's
ids); ``B1``–``B6`` are the catalogue's baselines; a method whose paper is in neither has an entry
keyed like a citation (``Kim2016``, ``Shao2024``). Fields:

- ``title``: as the paper (or, for a baseline that is not one paper, what the baseline is);
- ``authors``: short form, first author's surname ``et al.`` (both surnames for two authors);
- ``year``: of the arXiv preprint's first version (conference versions may carry the next year);
- ``arxiv``: the arXiv id, without version.

A field is empty (``""`` or ``None``) where it could not be established from the listing, the
catalogue, the method's docstring or the paper's arXiv page: nothing here is guessed. ``distill show
S35`` prints one entry, ``distill papers`` all of them, ``distill show kd`` a method's.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.errors import RecipeError, did_you_mean


@dataclass(frozen=True)
class Paper:
    id: str
    title: str
    authors: str = ""
    year: int | None = None
    arxiv: str = ""
    note: str = ""

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else ""

    def cite(self) -> str:
        """``Hinton et al. 2015, arXiv 1503.02531``; unknown fields left out (``—`` when none is known)."""
        who = " ".join(x for x in (self.authors, str(self.year) if self.year else "") if x)
        parts = [x for x in (who, f"arXiv {self.arxiv}" if self.arxiv else "") if x]
        return ", ".join(parts) or "—"


# (id, title, authors, year, arXiv id) in the order of the seed listing.
_SEEDS: tuple[tuple[str, str, str, int | None, str], ...] = (
    ("S01", "Reinforcement-aware Knowledge Distillation for LLM Reasoning", "Zhang et al.", 2026, "2602.22495"),
    ("S02", "TRAM: Bridging Trust Regions and Sharpness Aware Minimization", "Sherborne et al.", 2023, "2310.03646"),
    ("S03", "FIRST: Teach A Reliable Large Language Model Through Efficient Trustworthy Distillation", "Shum et al.", 2024, "2408.12168"),
    ("S04", "BD-KD: Balancing the Divergences for Online Knowledge Distillation", "Amara et al.", 2022, "2212.12965"),
    ("S05", "Masked Autoencoders Enable Efficient Knowledge Distillers", "Bai et al.", 2022, "2208.12256"),
    ("S06", "ADPO: Anchored Direct Preference Optimization", "Wang", 2025, "2510.18913"),
    ("S07", "Federated Distillation on Edge Devices: Efficient Client-Side Filtering for Non-IID Data", "", 2025, "2508.14769"),
    ("S08", "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge Distillation", "Hu et al.", 2023, "2312.15112"),
    ("S09", "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation", "Borup & Andersen", 2021, "2102.13088"),
    ("S10", "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning", "Xu et al.", 2025, "2505.24850"),
    ("S11", "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", "Bassam et al.", 2025, "2506.12542"),
    ("S12", "Diffusion Distillation With Direct Preference Optimization For Efficient 3D LiDAR Scene Completion", "", 2025, ""),
    ("S13", "FerKD: Surgical Label Adaptation for Efficient Distillation", "Shen", 2023, "2312.17473"),
    ("S14", "One Step Diffusion-based Super-Resolution with Time-Aware Distillation", "", 2024, ""),
    ("S15", "Pluggable Pruning with Contiguous Layer Distillation for Diffusion Transformers", "", 2025, "2511.16156"),
    ("S16", "Decoupled DMD: CFG Augmentation as the Spear, Distribution Matching as the Shield", "", 2025, "2511.22677"),
    ("S17", "Phased DMD: Few-step Distribution Matching Distillation via Score Matching within Subintervals", "", 2025, "2510.27684"),
    ("S18", "Learning beyond Teacher: Generalized On-Policy Distillation with Reward Extrapolation", "Yang et al.", 2026, "2602.12125"),
    ("S19", "Beyond Scaling Law: A Data-Efficient Distillation Framework for Reasoning", "Wu et al.", 2025, "2508.09883"),
    ("S20", "PointDistiller: Structured Knowledge Distillation Towards Efficient and Compact 3D Detection", "Zhang et al.", 2022, "2205.11098"),
    ("S21", "On Teacher Hacking in Language Model Distillation", "Tiapkin et al.", 2025, "2502.02671"),
    ("S22", "Distilling from Similar Tasks for Transfer Learning on a Budget", "", 2023, "2304.12314"),
    ("S23", "Efficient Distillation of Classifier-Free Guidance using Adapters", "", 2025, ""),
    ("S24", "AceReason-Nemotron: Advancing Math and Code Reasoning through Reinforcement Learning", "Chen et al.", 2025, "2505.16400"),
    ("S25", "Hyper-SD: Trajectory Segmented Consistency Model for Efficient Image Synthesis", "", 2024, "2404.13686"),
    ("S26", "Few-Step Diffusion via Score identity Distillation", "", 2025, ""),
    ("S27", "Distilling the Knowledge in Data Pruning", "Ben-Baruch et al.", 2024, "2403.07854"),
    ("S28", "You Only Need One Step: Fast Super-Resolution with Stable Diffusion via Scale Distillation", "", 2024, "2401.17258"),
    ("S29", "Distribution Backtracking Builds A Faster Convergence Trajectory for One-step Diffusion Distillation", "", 2024, ""),
    ("S30", "SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance", "", 2024, "2412.02687"),
    ("S31", "Towards One-step Causal Video Generation via Adversarial Self-Distillation", "", 2025, "2511.01419"),
    ("S32", "Consistency Trajectory Matching for One-Step Generative Super-Resolution", "", 2025, ""),
    ("S33", "Balanced Actor Initialization: Stable RLHF Training of Distillation-Based Reasoning Models", "Zheng et al.", 2025, "2509.00309"),
    ("S34", "Lightweight Image Super-Resolution with Information Multi-distillation Network", "Hui et al.", 2019, "1909.11856"),
    ("S35", "Logit Standardization in Knowledge Distillation", "Sun et al.", 2024, "2403.01427"),
    ("S36", "SCott: Accelerating Diffusion Models with Stochastic Consistency Distillation", "", 2024, "2403.01505"),
    ("S37", "Sealing The Backdoor: Unlearning Adversarial Text Triggers In Diffusion Models Using Knowledge Distillation", "", 2025, "2508.18235"),
    ("S38", "Recursive Meta-Distillation: An Axiomatic Framework for Iterative Knowledge Refinement", "Flouro & Chadwick", 2026, "2601.13100"),
    ("S39", "CLoCKDistill: Consistent Location-and-Context-aware Knowledge Distillation for DETRs", "", 2025, "2502.10683"),
    ("S40", "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation", "Hao et al.", 2023, "2310.19444"),
    ("S41", "Self-Knowledge Distillation with Progressive Refinement of Targets", "Kim et al.", 2020, "2006.12000"),
    ("S42", "On the Generalization vs Fidelity Paradox in Knowledge Distillation", "Ramesh et al.", 2025, "2505.15442"),
    ("S43", "Knowledge Distillation with Adapted Weight", "Wu et al.", 2025, "2501.02705"),
    ("S44", "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework", "Li et al.", 2022, "2212.08349"),
    ("S45", "Generic-to-Specific Distillation of Masked Autoencoders", "Huang et al.", 2023, "2302.14771"),
    ("S46", "Generating Synthetic Fair Syntax-agnostic Data by Learning and Distilling Fair Representation", "", 2024, "2408.10755"),
    ("S47", "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency", "", 2025, "2510.08431"),
    ("S48", "DDK: Distilling Domain Knowledge for Efficient Large Language Models", "Liu et al.", 2024, "2407.16154"),
    ("S49", "Linear Projections of Teacher Embeddings for Few-Class Distillation", "Loo et al.", 2024, "2409.20449"),
    ("S50", "Few-step Flow for 3D Generation via Marginal-Data Transport Distillation", "", 2025, ""),
    ("S51", "Not All Correct Answers Are Equal: Why Your Distillation Source Matters", "Tian et al.", 2025, "2505.14464"),
    ("S52", "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping", "", 2023, "2306.05544"),
    ("S53", "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation", "", 2025, "2503.06307"),
    ("S54", "Flash-DMD: Towards High-Fidelity Few-Step Image Generation with Efficient Distillation and Joint Reinforcement Learning", "", 2025, "2511.20549"),
    ("S55", "CALICO: Self-Supervised Camera-LiDAR Contrastive Pre-training for BEV Perception", "", 2023, "2306.00349"),
    ("S56", "SANA-Sprint: One-Step Diffusion with Continuous-Time Consistency Distillation", "Chen et al.", 2025, "2503.09641"),
    ("S57", "Distilling Diversity and Control in Diffusion Models", "", 2025, ""),
    ("S58", "Efficient Dataset Distillation through Alignment with Smooth and High-Quality Expert Trajectories", "", 2023, ""),
    ("S59", "DisWOT: Student Architecture Search for Distillation WithOut Training", "Dong et al.", 2023, "2303.15678"),
    ("S60", "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language Models", "Shing et al.", 2025, "2501.16937"),
)

_BASELINES: tuple[Paper, ...] = (
    Paper("B1", "Distilling the Knowledge in a Neural Network", "Hinton et al.", 2015, "1503.02531"),
    Paper("B2", "Decoupled Knowledge Distillation", "Zhao et al.", 2022, "2203.08679"),
    Paper("B3", "Token-level knowledge distillation for language models (baseline)",
          note="a baseline, not one paper: forward KL per token is B1's KD applied to next-token "
               "distributions; the generalized JSD is B5's, the skew KLs DistiLLM's"),
    Paper("B4", "Offline (sparse) teacher: top-k log-probs cached once (baseline)",
          note="a baseline, not one paper"),
    Paper("B5", "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", "Agarwal et al.",
          2023, "2306.13649", note="GKD; ICLR 2024"),
    Paper("B6", "Progressive Distillation for Fast Sampling of Diffusion Models", "Salimans & Ho", 2022, "2202.00512"),
)

_OTHERS: tuple[Paper, ...] = (
    Paper("Kim2016", "Sequence-Level Knowledge Distillation", "Kim & Rush", 2016, "1606.07947"),
    Paper("Shao2024", "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
          "Shao et al.", 2024, "2402.03300", note="introduces GRPO"),
    # the classic feature methods (issue 15); keyed by the venue year, the year field is the arXiv one
    Paper("Romero2015", "FitNets: Hints for Thin Deep Nets", "Romero et al.", 2014, "1412.6550"),
    Paper("Zagoruyko2017", "Paying More Attention to Attention: Improving the Performance of Convolutional Neural "
          "Networks via Attention Transfer", "Zagoruyko & Komodakis", 2016, "1612.03928"),
    Paper("Passalis2018", "Learning Deep Representations with Probabilistic Knowledge Transfer", "Passalis & Tefas",
          2018, "1803.10837"),
    Paper("Park2019", "Relational Knowledge Distillation", "Park et al.", 2019, "1904.05068"),
    Paper("Tung2019", "Similarity-Preserving Knowledge Distillation", "Tung & Mori", 2019, "1907.09682"),
    Paper("Ahn2019", "Variational Information Distillation for Knowledge Transfer", "Ahn et al.", 2019, "1904.05835"),
    Paper("Tian2020", "Contrastive Representation Distillation", "Tian et al.", 2019, "1910.10699"),
    Paper("Chen2021", "Distilling Knowledge via Knowledge Review", "Chen et al.", 2021, "2104.09044"),
    # the diffusion family (issue 14): its teachers, consistency and distribution-matching baselines
    Paper("Lipman2023", "Flow Matching for Generative Modeling", "Lipman et al.", 2022, "2210.02747"),
    Paper("Song2023", "Consistency Models", "Song et al.", 2023, "2303.01469"),
    Paper("Luo2023", "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference",
          "Luo et al.", 2023, "2310.04378"),
    Paper("Lu2024", "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", "Lu & Song", 2024,
          "2410.11081", note="sCM: the TrigFlow tangent that S56 and S47 build on"),
    Paper("Yin2024", "Improved Distribution Matching Distillation for Fast Image Synthesis", "Yin et al.", 2024,
          "2405.14867", note="DMD2"),
    Paper("Gao2021", "SimCSE: Simple Contrastive Learning of Sentence Embeddings", "Gao et al.", 2021, "2104.08821"),
)

PAPERS: dict[str, Paper] = {p.id: p for p in (*(Paper(*row) for row in _SEEDS), *_BASELINES, *_OTHERS)}

# Each registered method's papers, its own first (then papers it has as an option). An empty tuple is
# the explicit "no paper" marker (a baseline); tests/test_show.py requires every method to be listed.
METHOD_PAPERS: dict[str, tuple[str, ...]] = {
    # classifiers (distill/logits/methods)
    "ce": (),
    "bdkd": ("S04",),
    "swing": ("S44",),
    "kd": ("B1", "S35"),
    "dkd": ("B2", "S35"),
    "ferkd": ("S13",),
    "first": ("S03",),
    "kd_aif": ("S43",),
    "lelp": ("S49",),
    "pld": ("S11",),
    "pruned_kd": ("S27",),
    "pskd": ("S41",),
    "recursive": ("S38",),
    "self_distill": ("S09",),
    "taid": ("S60",),
    "tgeo": ("S08",),
    "unlearn_trigger": ("S37",),
    # language models (distill/lm/methods)
    "sft": (),
    "lm_kd": ("B3", "B4"),
    "seq_kd": ("Kim2016",),
    "gkd": ("B5",),
    "lm_taid": ("S60",),
    "lm_swing": ("S44",),
    "lm_first": ("S03",),
    "grpo": ("Shao2024",),
    "gopd": ("S18",),
    "rlad": ("S01",),
    "redi": ("S10",),
    "adpo": ("S06",),
    # features (distill/features/methods)
    "ofa": ("S40",),
    "dmae": ("S05",),
    "g2sd": ("S45",),
    "acam": ("S53",),
    "sr_train": ("S34",),
    "sr_kd": ("S34",),
    "multi_source": ("S22",),
    "fair_vae": ("S46",),
    "fair_latent": ("S46",),
    "clock": ("S39",),
    "pointdistiller": ("S20",),
    "calico": ("S55",),
    "detr_kd": (),
    "detr_train": (),
    "fitnet": ("Romero2015",),
    "at": ("Zagoruyko2017",),
    "pkt": ("Passalis2018",),
    "rkd": ("Park2019",),
    "sp": ("Tung2019",),
    "vid": ("Ahn2019",),
    "crd": ("Tian2020",),
    "reviewkd": ("Chen2021",),
    # diffusion (distill/diffusion/methods)
    "diffusion_train": ("Lipman2023",),
    "naive": (),
    "progressive": ("B6",),
    "cd": ("Song2023", "Luo2023"),
    "scott": ("S36",),
    "tscd": ("S25",),
    "scm": ("S56", "Lu2024"),
    "sana_sprint": ("S56",),
    "rcm": ("S47",),
    "dmd": ("Yin2024",),
    "decoupled_dmd": ("S16",),
    "phased_dmd": ("S17",),
    "flash_dmd": ("S54",),
    "sentence_kd": ("Romero2015",),
    "simcse": ("Gao2021",),
}

# Features that are not methods, for ``distill show ID`` ("used by").
FEATURE_PAPERS: dict[str, tuple[str, ...]] = {
    "train.sharpness: tram": ("S02",),
    "fidelity metrics (test/agreement, test/kl_to_teacher)": ("S42",),
    "train.sampler: {name: ddk}": ("S48",),
    "stages: (staged recipes)": ("S24",),
    "distill merge, init: {merge: ...}": ("S33",),
    "distill analyze-traces": ("S19", "S51"),
    "distill hacking": ("S21",),
    "standardize: true (kd, dkd)": ("S35",),
    "distill search-student": ("S59",),
    "distill prune-layers": ("S15",),
}


def get(paper_id: str) -> Paper:
    """The entry of ``paper_id`` (case-insensitive); a ``RecipeError`` with a suggestion otherwise."""
    key = {k.lower(): k for k in PAPERS}.get(paper_id.strip().lower())
    if key is None:
        raise RecipeError(f"unknown paper id '{paper_id}'{did_you_mean(paper_id, PAPERS)}; `distill papers` lists them")
    return PAPERS[key]


def find(paper_id: str) -> Paper | None:
    key = {k.lower(): k for k in PAPERS}.get(paper_id.strip().lower())
    return PAPERS[key] if key is not None else None


def method_papers(method: str) -> list[Paper] | None:
    """The papers of ``method`` (its own first); ``[]`` for a method without a paper, ``None`` if unlisted."""
    ids = METHOD_PAPERS.get(method)
    return None if ids is None else [PAPERS[i] for i in ids]


def used_by(paper_id: str) -> list[str]:
    """Methods and features that implement ``paper_id``."""
    methods = [f"method {m}" for m, ids in METHOD_PAPERS.items() if paper_id in ids]
    return methods + [f for f, ids in FEATURE_PAPERS.items() if paper_id in ids]


def markdown_rows(ids: list[str]) -> list[str]:
    """``| id | title | authors | year | arXiv |`` rows (the README's paper table)."""
    rows = []
    for i in ids:
        p = PAPERS[i]
        arxiv = f"[{p.arxiv}]({p.url})" if p.arxiv else "—"
        rows.append(f"| {p.id} | {p.title} | {p.authors or '—'} | {p.year or '—'} | {arxiv} |")
    return rows
