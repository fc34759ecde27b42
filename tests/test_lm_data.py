"""Data side of the language-model tasks: arithmetic, pytext, collation, JSONL, tiny model."""

from __future__ import annotations

import random
import re

import pytest
import torch

from distill.errors import MissingFileError, RecipeError
from distill.lm.data.arithmetic import (
    CharTokenizer,
    Difficulty,
    Problem,
    build_examples,
    encode_prompt,
    exact_match,
    generate_problems,
    parse_answer,
    verify,
)
from distill.lm.data.pytext import corpus_fingerprint, split_documents, train_bpe
from distill.lm.data.text import (
    Example,
    collate,
    encode_records,
    encode_text,
    load_jsonl,
    pack_blocks,
    tiny_causal_lm,
)

ALL = Difficulty(1, 5, ("+", "-", "*"), negative=True)


# ------------------------------------------------------------------------------------------ arithmetic


def test_generator_deterministic_and_private_rng():
    random.seed(123)
    state = random.getstate()
    a = generate_problems(50, 7, ALL)
    assert random.getstate() == state  # the global RNG is untouched
    assert a == generate_problems(50, 7, ALL)
    assert a != generate_problems(50, 8, ALL)


def test_difficulty():
    d = Difficulty(3, 4, ("*",))
    for p in generate_problems(200, 0, d):
        assert p.op == "*" and 3 <= len(str(p.a)) <= 4 and 2 <= p.b <= 9
    for p in generate_problems(200, 0, Difficulty(2, 2, ("+", "-"))):
        assert p.op in "+-" and len(str(p.a)) == len(str(p.b)) == 2 and p.answer >= 0
    assert {p.op for p in generate_problems(200, 0, ALL)} == {"+", "-", "*"}
    assert any(p.answer < 0 for p in generate_problems(200, 0, ALL))
    with pytest.raises(RecipeError):
        Difficulty(3, 2)
    with pytest.raises(RecipeError):
        Difficulty(ops=("/",))  # type: ignore[arg-type]


def test_trace_correct_for_many_problems():
    for p in generate_problems(2000, 1, ALL) + [Problem(999, "+", 1), Problem(1000, "-", 1), Problem(0, "-", 0),
                                                Problem(5, "-", 12), Problem(99999, "*", 9)]:
        expected = {"+": p.a + p.b, "-": p.a - p.b, "*": p.a * p.b}[p.op]
        lines = p.completion.split("\n")
        assert lines[-1] == f"#{expected}"
        assert parse_answer(p.completion) == expected
        for line in lines[:-1]:
            if "<" in line:
                continue
            eq, partial = line.split("|")
            lhs, rhs = eq.split("=")
            assert eval(lhs) == int(rhs), (p, line)  # every step is a true equation
            assert re.fullmatch(r"\d+", partial)
        assert int(lines[-2].split("|")[1]) == abs(expected)


def test_verify():
    p = Problem(347, "+", 589)
    assert p.completion == "7+9+0=16|6\n4+8+1=13|36\n3+5+1=9|936\n#936"
    assert verify(p.completion, p) and verify("#936", p) and verify("junk\n#936\n", p)
    for bad in ["#937", "", "936", "#", "#93 6", "#9a36", "#-936", "steps\n#0936x", "# 936 937"]:
        assert not verify(bad, p), bad
    assert verify("#-4", Problem(3, "-", 7)) and not verify("#4", Problem(3, "-", 7))
    assert parse_answer("#12\n#13") == 12  # the first answer line counts
    ps = generate_problems(4, 0)
    assert exact_match([q.completion for q in ps], ps) == 1.0
    assert exact_match([ps[0].completion, "#x", "", ps[3].completion], ps) == 0.5


def test_char_tokenizer_round_trip_and_special_ids():
    tok = CharTokenizer()
    hf = tok.to_hf()
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert len(hf) == len(tok) == 23
    assert {tok.bos_token_id, tok.eos_token_id}.isdisjoint({1, 2})  # not LlamaConfig's defaults
    for p in generate_problems(50, 3, ALL):
        text = p.prompt + p.completion
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids) == text
        assert hf(text)["input_ids"] == [tok.bos_token_id] + ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode([tok.bos_token_id] + ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_label_masking_and_collation():
    tok = CharTokenizer()
    problems, examples = build_examples(6, 0, ALL, tok)
    batch = collate(examples, tok.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 6
    for row, p in enumerate(problems):
        n_prompt = 1 + len(p.prompt)
        completion = tok.encode(p.completion) + [tok.eos_token_id]
        n = n_prompt + len(completion)
        assert mask[row].sum() == n and mask[row, :n].all()
        assert (labels[row, :n_prompt] == -100).all() and (labels[row, n:] == -100).all()
        assert labels[row, n_prompt:n].tolist() == completion == ids[row, n_prompt:n].tolist()
        assert (ids[row, n:] == tok.pad_token_id).all()
    assert int((labels != -100).sum()) == sum(len(p.completion) + 1 for p in problems)
    left = collate([encode_prompt(p, tok) for p in problems], tok.pad_token_id, padding_side="left")
    assert left["attention_mask"][:, -1].all() and (left["labels"] == -100).all()


# -------------------------------------------------------------------------------------------- pytext


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(list(split_documents(0).train.values()), vocab_size=600)


def test_pytext_split_deterministic_and_disjoint():
    a, b, c = split_documents(0), split_documents(0), split_documents(1)
    assert a == b and a != c
    keys = [set(a.train), set(a.val), set(a.test)]
    assert all(keys) and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    from pydoc_data.topics import topics
    assert keys[0] | keys[1] | keys[2] == set(topics)
    assert len(corpus_fingerprint()) == 16


def test_bpe_round_trip_and_specials(bpe):
    assert len(bpe) == 600
    assert (bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id) == (597, 598, 599)
    test_doc = next(iter(split_documents(0).test.values()))
    for text in [test_doc[:2000], "naïve — ünïcode ✓ and \t tabs\n\n  spaces", "def f(x):\n    return x ** 2\n"]:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.decode(ids) == text
    assert len(bpe(test_doc[:2000])["input_ids"]) < 2000 / 2  # merges compress the prose


def test_pack_blocks_shapes(bpe):
    docs = [bpe(t)["input_ids"] for t in list(split_documents(0).val.values())]
    total = sum(len(d) + 2 for d in docs)
    out = pack_blocks(docs, 64, bpe.bos_token_id, bpe.eos_token_id)
    assert out["input_ids"].shape == (total // 64, 64) == out["labels"].shape == out["attention_mask"].shape
    assert torch.equal(out["labels"], out["input_ids"]) and out["attention_mask"].all()
    assert out["input_ids"][0, 0] == bpe.bos_token_id
    tail = pack_blocks([[5, 6, 7]], 2, None, 9, drop_last=False)
    assert tail["input_ids"].tolist() == [[5, 6], [7, 9]]
    tail = pack_blocks([[5, 6, 7]], 3, 8, 9, drop_last=False)
    assert tail["input_ids"].tolist() == [[8, 5, 6], [7, 9, 9]]
    assert tail["labels"].tolist() == [[8, 5, 6], [7, 9, -100]] and tail["attention_mask"][1].tolist() == [1, 1, 0]


# --------------------------------------------------------------------------------------- tiny model


def _greedy_by_hand(model, ids: torch.Tensor, steps: int, eos: int) -> list[int]:
    out = []
    for _ in range(steps):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_tiny_causal_lm_ids_and_generate_matches_greedy():
    hf = CharTokenizer().to_hf()
    model = tiny_causal_lm(None, 32, 2, 2, hf, seed=0).eval()
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert model.config.vocab_size == len(hf)
    with torch.no_grad():
        for p in generate_problems(4, 0, ALL):
            ids = hf(p.prompt, return_tensors="pt")["input_ids"]
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                                 pad_token_id=hf.pad_token_id, eos_token_id=hf.eos_token_id)
            new = gen[0, ids.shape[1]:].tolist()
            assert new == _greedy_by_hand(model, ids, 5, hf.eos_token_id)
    # make the digit '2' (id 2, LlamaConfig's default eos) the first greedy token: a model built with the
    # default ids would stop there, this one must go on
    with torch.no_grad():
        ids = hf(generate_problems(1, 5)[0].prompt, return_tensors="pt")["input_ids"]
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight[2] = 100 * h / h.dot(h)
        by_hand = _greedy_by_hand(model, ids, 5, hf.eos_token_id)
        assert by_hand[0] == 2 and len(by_hand) == 5
        for kwargs in ({}, {"pad_token_id": hf.pad_token_id, "eos_token_id": hf.eos_token_id}):
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=5, **kwargs)
            assert gen[0, ids.shape[1]:].tolist() == by_hand
    a = tiny_causal_lm(None, 16, 1, 2, hf, seed=3)
    b = tiny_causal_lm(None, 16, 1, 2, hf, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(RecipeError):
        tiny_causal_lm(10, 16, 1, 2, hf)


# ------------------------------------------------------------------------------------------- JSONL


def test_jsonl_loading_and_errors(tmp_path):
    good = tmp_path / "pc.jsonl"
    good.write_text('{"prompt": "2+2\\n", "completion": "#4", "id": 1}\n\n{"prompt": "1+1\\n", "completion": "#2"}\n')
    recs = load_jsonl(good)
    assert [r.kind for r in recs] == ["prompt_completion"] * 2 and recs[0].completion == "#4"
    hf = CharTokenizer().to_hf()
    ex = encode_records(recs, hf)
    assert ex[0] == Example([hf.bos_token_id] + hf("2+2\n#4", add_special_tokens=False)["input_ids"] + [hf.eos_token_id],
                            [-100] * 5 + hf("#4", add_special_tokens=False)["input_ids"] + [hf.eos_token_id])
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "12"}\n')
    assert load_jsonl(text)[0].text == "12"
    assert encode_records(load_jsonl(text), hf)[0] == encode_text([1, 2], hf.bos_token_id, hf.eos_token_id)

    with pytest.raises(MissingFileError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    cases = {
        '{"text": "a"}\n{"text": }\n': r"bad.jsonl:2: not valid JSON",
        '["a"]\n': r"bad.jsonl:1: a record must be a JSON object",
        '{"prompt": "a"}\n': r"bad.jsonl:1: .*'completion'",
        '{"foo": "a"}\n': r"bad.jsonl:1: record needs",
        '{"text": 3}\n': r"bad.jsonl:1: field 'text' must be a string",
        '{"text": "a"}\n{"prompt": "a", "completion": "b"}\n': r"bad.jsonl:2: .*one kind per file",
        "\n": r"no records",
    }
    bad = tmp_path / "bad.jsonl"
    for content, msg in cases.items():
        bad.write_text(content)
        with pytest.raises(RecipeError, match=msg):
            load_jsonl(bad)
