"""PPCL (S15) layer pruning: span scores, dropping, layer-wise (teacher-forced) distillation, the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from distill.cli import app
from distill.features.tools import ppcl
from distill.lm.data.task import TokenDataset
from distill.lm.data.text import Example, tiny_causal_lm

TOK = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _model(layers: int = 3, seed: int = 0):
    m = tiny_causal_lm(40, 16, layers, 2, TOK, seed=seed)
    with torch.no_grad():  # larger weights: layers change their input visibly
        for p in m.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return m.eval()


def _split(n: int = 8, length: int = 10, seed: int = 0) -> TokenDataset:
    g = torch.Generator().manual_seed(seed)
    ex = []
    for _ in range(n):
        ids = torch.randint(3, 40, (length,), generator=g).tolist()
        ex.append(Example(ids, ids))
    return TokenDataset(ex, 0)


class _Identity(torch.nn.Module):
    """Stands in for a decoder layer: returns its input hidden states."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _raw_outputs(model, batch) -> list[torch.Tensor]:
    """Every decoder layer's raw output, by plain forward hooks (independent of FeatureTap)."""
    outs: dict[int, torch.Tensor] = {}
    hs = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
          for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hs:
            h.remove()
    return [outs[i] for i in range(len(outs))]


def test_layer_targets_by_hand() -> None:
    # 6 layers, drop 2..3: kept 0 1 4 5; the layer after the span (4) is fed h_2 and matched to h_5
    assert ppcl.layer_targets(6, 2, 2) == ([1, 2, 5, 6], [0, 1, 2, 5])
    # a tail span: the last kept layer absorbs it (matched to h_L)
    assert ppcl.layer_targets(4, 2, 2) == ([1, 4], [0, 1])
    assert ppcl.layer_targets(3, 0, 1) == ([2, 3], [0, 2])


def test_drop_span_equals_identity_layers() -> None:
    t = _model(4)
    s = ppcl.drop_span(t, 1, 2)
    assert s.config.num_hidden_layers == 2 and len(s.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in s.model.layers] == [0, 1]
    assert len(t.model.layers) == 4  # the teacher is left whole
    ref = _model(4)
    ref.model.layers[1] = _Identity()
    ref.model.layers[2] = _Identity()
    batch = _split().__getitems__([0, 1])
    with torch.no_grad():
        a = s(input_ids=batch["input_ids"]).logits
        b = ref(input_ids=batch["input_ids"]).logits
        full = t(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(a, b)
    assert (a - full).abs().max() > 1e-3
    with pytest.raises(Exception, match="keep at least one"):
        ppcl.drop_span(t, 0, 4)


def test_hidden_states_are_layer_inputs_and_outputs() -> None:
    t = _model(3)
    batch = _split().__getitems__([0, 1, 2])
    hs = ppcl.hidden_states(t, batch)
    with torch.no_grad():
        emb = t.model.embed_tokens(batch["input_ids"])
    raw = _raw_outputs(t, batch)
    assert len(hs) == 4
    torch.testing.assert_close(hs[0], emb)
    for i in range(3):
        torch.testing.assert_close(hs[i + 1], raw[i])


@pytest.mark.parametrize("mode", ["teacher_forced", "sequential"])
def test_layerwise_loss_against_identity_teacher(mode: str) -> None:
    """Drop layer 0 of 3: student layers = teacher layers 1, 2. Teacher-forced, layer 1 is fed h_0 and
    matched to h_2, layer 2 is fed h_2 (zero loss); sequential, layer 2 is fed layer 1's output."""
    t = _model(3)
    split = _split()
    student = ppcl.drop_span(t, 0, 1)
    got = ppcl.distill_layers(student, t, 0, 1, split, steps=1, lr=0.0, batch_size=4, mode=mode, seed=3)[0]
    batch = next(ppcl._batches(split, 4, 3))  # the batch the first step used
    h = _raw_outputs(t, batch)  # h_1, h_2, h_3
    ref = _model(3)
    ref.model.layers[0] = _Identity()
    p = _raw_outputs(ref, batch)  # [h_0, L1(h_0), L2(L1(h_0))]
    mse = lambda a, b: (a - b).pow(2).mean()  # noqa: E731
    want = mse(p[1], h[1])
    if mode == "sequential":
        want = want + mse(p[2], h[2])
    assert want > 1e-6
    assert got == pytest.approx(float(want), rel=1e-4)


def test_distillation_trains_only_layers_and_lowers_the_loss() -> None:
    t = _model(3)
    student = ppcl.drop_span(t, 1, 1)
    emb = student.model.embed_tokens.weight.clone()
    losses = ppcl.distill_layers(student, t, 1, 1, _split(16), steps=30, lr=3e-3, batch_size=8)
    assert losses[-1] < 0.7 * losses[0]
    # sequential: the loss reaches the embeddings too, which must stay the teacher's
    ppcl.distill_layers(student, t, 1, 1, _split(16), steps=3, lr=3e-3, batch_size=8, mode="sequential")
    torch.testing.assert_close(student.model.embed_tokens.weight, emb)
    assert all(p.requires_grad for p in student.parameters())  # left trainable for the caller


def test_ridge_r2_and_span_choice_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    w = torch.randn(6, 5, generator=g)
    assert ppcl.ridge_r2(x[:200], x[:200] @ w, x[200:], x[200:] @ w) == pytest.approx(1.0, abs=1e-3)
    noise = torch.randn(400, 5, generator=g)
    assert ppcl.ridge_r2(x[:200], noise[:200], x[200:], noise[200:]) < 0.1
    # four "layers"; layer 1 is the identity (h_2 = h_1), the others random maps
    hs = [torch.randn(300, 8, generator=g)]
    for i in range(4):
        hs.append(hs[-1].clone() if i == 1 else torch.tanh(hs[-1] @ torch.randn(8, 8, generator=g)) + 0.3 * torch.randn(300, 8, generator=g))
    sc = ppcl.layer_scores(hs, drop=1)
    assert sc.cka[1] == pytest.approx(1.0, abs=1e-5)
    assert sc.trend == pytest.approx([sc.cka[i + 1] - sc.cka[i] for i in range(3)])
    assert ppcl.choose_span(sc) == 1
    assert [s["start"] for s in sc.spans] == [0, 1, 2, 3]
    assert ppcl.layer_scores(hs, drop=3).spans[-1]["start"] == 1


def test_prune_layers_cli(tmp_path) -> None:
    from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
    from distill.lm.models import load_causal_lm

    data = build_arithmetic(ArithmeticParams(num_train=40, num_val=8, num_test=8))
    model = tiny_causal_lm(None, 16, 3, 2, data.tokenizer, seed=0)
    src = tmp_path / "model"
    data.save_model(src, model, None)
    runner = CliRunner()
    args = ["prune-layers", str(src), "--drop", "1", "--task", "arithmetic", "--task-set", "num_train=40",
            "--task-set", "num_val=8", "--task-set", "num_test=8", "--distill-steps", "3", "--probe-tokens", "200",
            "--baselines", "--out", str(tmp_path / "pruned")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "pruned"
    m = load_causal_lm(out)
    assert m.config.num_hidden_layers == 2 and len(m.model.layers) == 2
    rep = json.loads((out / "ppcl.json").read_text())
    assert [x["name"] for x in rep["runs"]] == ["ppcl", "last", "random"]
    assert rep["runs"][0]["ppl_distilled"] is not None and len(rep["scores"]["cka"]) == 3
    assert (out / "ppcl.png").is_file() and (out / "ppcl.md").is_file() and (out / "tokenizer.json").is_file()
    again = runner.invoke(app, args)  # never overwrites without --overwrite
    assert again.exit_code == 2 and "exists" in again.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    r = runner.invoke(app, [*args[:-1], str(foreign), "--overwrite"])
    assert r.exit_code == 2 and "not written by this command" in r.output
    assert (foreign / "keep.txt").is_file()
    r = runner.invoke(app, ["prune-layers", str(src), "--drop", "3", "--task", "arithmetic", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "drop between 1 and 2" in r.output
