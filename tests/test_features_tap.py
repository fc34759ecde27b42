"""FeatureTap: captured outputs equal a manual forward (our CNN, a tiny HF BERT, our ViT), stop_after
really skips the later layers and returns the same features, errors name the layer, hooks come off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.errors import RecipeError
from distill.features import FeatureTap, default_layers, feature_shapes
from distill.features.tap import resolve_layer
from distill.tasks.models import build_model


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("convnet", {"width": 4, "depth": 3}, (8, 8), 10).eval()


def _count_calls(model: nn.Module) -> dict[str, int]:
    calls = {n: 0 for n, _ in model.named_modules()}

    def hook(name):
        def f(*_):
            calls[name] += 1
        return f

    for n, m in model.named_modules():
        m.register_forward_pre_hook(hook(n))
    return calls


def test_tap_equals_a_manual_forward_of_the_cnn():
    m, x = _cnn(), torch.randn(5, 8, 8)
    with FeatureTap(m, ["stages.0", "stages.2", "pool"]) as tap:
        logits = m(x)
        h0 = m.stages[0](x)
        h2 = m.stages[2](m.stages[1](h0))
        torch.testing.assert_close(tap["stages.0"], h0, rtol=0, atol=0)
        torch.testing.assert_close(tap["stages.2"], h2, rtol=0, atol=0)
        torch.testing.assert_close(m.head(tap["pool"]), logits, rtol=0, atol=0)
        assert tap.features()[1] is tap["stages.2"]
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())  # detached on exit
    assert tap["stages.0"].shape == (5, 4, 8, 8)  # values stay readable after exit


def test_each_forward_replaces_the_captured_outputs_and_keeps_the_graph():
    m = _cnn().train()
    tap = FeatureTap(m, ["stages.1"]).attach()
    x1, x2 = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    m(x1)
    first = tap["stages.1"]
    m(x2)
    assert not torch.equal(first, tap["stages.1"])
    tap["stages.1"].sum().backward()  # the student's features train it
    assert m.stages[0][1].weight.grad is not None and m.stages[2][0].weight.grad is None
    second = tap["stages.1"]
    tap.detach()
    m(x1)
    assert tap["stages.1"] is second  # detached: no longer updated
    tap.clear()
    with pytest.raises(KeyError, match="did not run"):
        tap["stages.1"]


def test_tiny_hf_bert_layers_equal_its_hidden_states():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (2, 7))
    layers = default_layers(bert)  # its longest list of blocks
    assert layers == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    with FeatureTap(bert, [layers[0], layers[2], ""]) as tap:  # "" is the model itself: a ModelOutput
        out = bert(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(tap[layers[0]], out.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(tap[layers[2]], out.hidden_states[3], rtol=0, atol=0)
    torch.testing.assert_close(tap[""], out.last_hidden_state, rtol=0, atol=0)  # ModelOutput -> item 0


def test_our_vit_layers_and_a_tuple_output_with_select():
    torch.manual_seed(0)
    m = build_model("vit", {"hidden": 16, "depth": 2, "heads": 2}, (8, 8), 10).eval()
    x = torch.randn(3, 8, 8)
    names = m.feature_layers()
    with FeatureTap(m, names) as tap:
        m(x)
    hs = m.vit(pixel_values=x.unsqueeze(1), output_hidden_states=True).hidden_states
    for i, n in enumerate(names):
        torch.testing.assert_close(tap[n], hs[i + 1], rtol=0, atol=0)

    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return a + b

    net, z = Net(), torch.arange(3.0)
    with (FeatureTap(net, ["pair"]) as t0, FeatureTap(net, ["pair"], select=1) as t1,
          FeatureTap(net, ["pair"], select=lambda out: out[0] - out[1]) as tc):
        net(z)
    assert t0["pair"].tolist() == [1, 2, 3] and t1["pair"].tolist() == [0, 2, 4] and tc["pair"].tolist() == [1, 0, -1]


def test_stop_after_skips_the_later_layers_and_returns_the_same_features():
    m, x = _cnn(), torch.randn(4, 8, 8)
    with FeatureTap(m, ["stages.1"]) as full:
        logits = m(x)
    calls = _count_calls(m)
    tap = FeatureTap(m, ["stages.1", "stages.0"], stop_after=True)
    assert tap.run(m, x) is None
    torch.testing.assert_close(tap["stages.1"], full["stages.1"], rtol=0, atol=0)
    assert calls["stages.0"] == calls["stages.1"] == 1
    assert calls["stages.2"] == calls["pool"] == calls["head"] == 0  # never executed
    assert not any(mod._forward_hooks for mod in m.modules())  # run() attached and detached
    # outside run() a stop_after tap never stops a plain forward
    with tap:
        torch.testing.assert_close(m(x), logits, rtol=0, atol=0)
    assert calls["head"] == 1
    # without stop_after, run() returns the model's output
    assert torch.equal(FeatureTap(m, ["stages.0"]).run(m, x), logits)


def test_profile_counts_skipped_leaves_and_flops():
    m, x = _cnn(), torch.randn(2, 8, 8)
    prof = FeatureTap(m, ["stages.0"], stop_after=True).profile(m, x, flops=True)
    # leaves: stage 0 = AddChannel, conv, bn, relu; stages 1-2 = conv, bn, relu each; pool = avgpool, flatten; head
    assert prof.leaf_modules == 4 + 3 + 3 + 2 + 1
    assert prof.skipped == 3 + 3 + 2 + 1
    # conv FLOPs by hand: 2·N·C_out·H·W·(C_in·9); stage 0 is 1 -> 4 channels on 8x8
    assert prof.flops_partial == 2 * 2 * 4 * 8 * 8 * 9
    assert 0 < prof.flops_saved < 1 and prof.flops_full > prof.flops_partial


def test_unknown_layer_is_one_line_with_a_close_match():
    m = _cnn()
    with pytest.raises(RecipeError) as e:
        FeatureTap(m, ["stage.1"])
    assert "no layer 'stage.1'" in str(e.value) and "did you mean 'stages.1'" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="its layers include stages"):
        resolve_layer(m, "zzz")
    with pytest.raises(KeyError, match="not tapped"):
        FeatureTap(m, ["stages.0"])["stages.1"]


def test_feature_shapes_leave_batch_norm_statistics_alone():
    m = _cnn().train()
    bn = next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    shapes = feature_shapes(m, m.feature_layers(), torch.randn(3, 8, 8))
    assert shapes == {"stages.0": (4, 8, 8), "stages.1": (8, 4, 4), "stages.2": (16, 2, 2)}
    assert torch.equal(bn.running_mean, before) and m.training


def test_default_layers_of_our_archs_and_an_error_for_a_plain_model():
    assert default_layers(_cnn()) == ["stages.0", "stages.1", "stages.2"]
    vit = build_model("vit", {"hidden": 8, "depth": 3, "heads": 2}, (8, 8), 10)
    assert default_layers(vit) == vit.feature_layers() and len(vit.feature_layers()) == 3
    assert default_layers(build_model("mlpnet", {"width": 8, "depth": 2}, (40,), 10)) == ["stages.0", "stages.1"]
    with pytest.raises(RecipeError, match="name its layers"):
        default_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
