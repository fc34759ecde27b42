"""CRD (issue 15): the NCE loss by hand, the critic scores from the memory banks, the class-aware
negatives, the momentum update, the fixed normaliser Z, and the bank surviving a resume bitwise."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import resume_round_trip, tiny_recipe, tiny_teacher
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.features.losses import nce_contrast_loss
from distill.features.methods.crd import CRD, CRDParams, negative_table, sample_negatives
from distill.tasks.base import ArrayDataset
from distill.tasks.models import build_model

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, -1])


def nce_by_hand(x: torch.Tensor, n_data: int, eps: float = 1e-7) -> float:
    """Tian et al. Eq. 18 as the official ContrastLoss, with explicit loops."""
    m, pn = x.shape[1] - 1, 1.0 / n_data
    total = 0.0
    for i in range(x.shape[0]):
        pos = x[i, 0].item()
        total += math.log(pos / (pos + m * pn + eps))
        for j in range(1, x.shape[1]):
            total += math.log(m * pn / (x[i, j].item() + m * pn + eps))
    return -total / x.shape[0]


def crd(**kw) -> CRD:
    torch.manual_seed(0)
    s = build_model("cnn2d", {"width": 4, "depth": 2}, (8, 8), 4)
    t = build_model("cnn2d", {"width": 6, "depth": 2}, (8, 8), 4)
    x = torch.rand(len(LABELS), 8, 8)
    info = TaskInfo(4, len(LABELS), (8, 8), 8, train=ArrayDataset(x, LABELS))
    return CRD(s, t, CRDParams(**({"feat_dim": 8, "nce_k": 4} | kw)), info)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([0, 3, 4, 8])
    return {"x": torch.rand(4, 8, 8, generator=g), "y": LABELS[idx], "index": idx}


def test_nce_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 6, generator=g) * 0.02
    assert nce_contrast_loss(x, 100).item() == pytest.approx(nce_by_hand(x, 100), rel=1e-5)
    # a larger positive score and smaller negative ones lower the loss
    better = x.clone()
    better[:, 0] *= 10
    better[:, 1:] /= 10
    assert nce_contrast_loss(better, 100) < nce_contrast_loss(x, 100)


def test_negatives_come_from_other_classes_without_replacement_when_possible():
    table, lengths = negative_table(LABELS, 4)
    assert lengths.tolist() == [6, 6, 6, 6, 10]  # labeled samples of the 3 other classes; unlabeled: any row
    torch.manual_seed(0)
    rows = torch.tensor([0, 1, 2, 3, 4])
    neg = sample_negatives(table, lengths, rows, 6)
    for r, row in zip(rows.tolist(), neg.tolist()):
        assert len(set(row)) == 6  # without replacement
        if r < 4:
            assert all(int(LABELS[j]) not in (r, -1) for j in row)
    many = sample_negatives(table, lengths, torch.tensor([0]), 50)  # k > 6: with replacement
    assert many.shape == (1, 50) and all(int(LABELS[j]) in (1, 2, 3) for j in many[0].tolist())


def test_scores_z_and_momentum_update_by_hand():
    d, b = crd(), batch()
    assert d.k == 4 and crd(nce_k=16384).k == len(LABELS) - 1  # k capped by the dataset
    ref = copy.deepcopy(d)
    torch.manual_seed(7)
    step = d.training_step(b)
    torch.manual_seed(7)  # the same negatives: the forwards draw no random numbers
    with torch.no_grad():
        v_s = ref.projectors["embed_s"](ref.student.embed(b["x"]))
        v_t = ref.projectors["embed_t"](ref.teacher.embed(b["x"]))
        _, _, idx = ref.contrast(v_s, v_t, b["index"], b["y"])
    assert idx[:, 0].tolist() == b["index"].tolist()  # the positive is the sample's own row
    for i in range(3):  # labeled anchors: negatives of other classes
        assert all(int(LABELS[j]) not in (int(b["y"][i]), -1) for j in idx[i, 1:].tolist())
    raw_s = [[math.exp(float(ref.memory_t[j] @ v_s[i]) / 0.07) for j in idx[i].tolist()] for i in range(4)]
    raw_t = [[math.exp(float(ref.memory_s[j] @ v_t[i]) / 0.07) for j in idx[i].tolist()] for i in range(4)]
    z_s = sum(map(sum, raw_s)) / (4 * 5) * len(LABELS)  # Z = mean score × n, from the first batch
    z_t = sum(map(sum, raw_t)) / (4 * 5) * len(LABELS)
    assert d.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    out_s = torch.tensor([[v / z_s for v in row] for row in raw_s])
    out_t = torch.tensor([[v / z_t for v in row] for row in raw_t])
    crd_by_hand = nce_by_hand(out_s, len(LABELS)) + nce_by_hand(out_t, len(LABELS))
    assert step.metrics["crd"].item() == pytest.approx(crd_by_hand, rel=1e-4)
    with torch.no_grad():
        logits = ref.student(b["x"])
    ce = torch.nn.functional.cross_entropy(logits[:3], b["y"][:3]).item()
    assert step.losses["student"].item() == pytest.approx(ce + 0.8 * crd_by_hand, rel=1e-4)
    # the banks' rows of the batch: normalise(0.5 · old + 0.5 · new), the other rows untouched
    for bank, old, v in ((d.memory_s, ref.memory_s, v_s), (d.memory_t, ref.memory_t, v_t)):
        for row, i in enumerate(b["index"].tolist()):
            new = 0.5 * old[i] + 0.5 * v[row]
            torch.testing.assert_close(bank[i], new / new.norm())
        torch.testing.assert_close(bank[[1, 2, 5, 6, 7, 9]], old[[1, 2, 5, 6, 7, 9]])
    z = d.z.clone()
    d.training_step(b)
    assert torch.equal(d.z, z)  # Z is set once


def test_the_bank_is_in_the_state_dict_and_sam_replays_do_not_update_it():
    d = crd()
    sd = d.state_dict()
    assert {"memory_s", "memory_t", "z"} <= set(sd) and "neg_table" not in sd
    mem = d.memory_s.clone()
    d.replaying = True
    d.training_step(batch())
    assert torch.equal(d.memory_s, mem)


@pytest.mark.slow
def test_crd_resumes_with_the_same_memory_bank(tmp_runs):
    def inspect(ckpt):
        w = load_file(str(ckpt / "model.safetensors"))
        assert w["memory_s"].shape == (512, 16) and (w["z"] > 0).all()  # 256 labeled + 256 transfer rows

    method = {"name": "crd", "feat_dim": 16, "nce_k": 64, "kd_weight": 1.0}
    resume_round_trip(tiny_recipe("crd", method, {"recipe": tiny_teacher()}, epochs=2), tmp_runs, 5, inspect)


def test_critic_scores_every_row_or_gathers_the_same_numbers():
    from distill.features.methods.crd import critic
    g = torch.Generator().manual_seed(0)
    bank, v = torch.randn(30, 8, generator=g), torch.randn(4, 8, generator=g)
    for k in (3, 20):  # 4 × 4 < 30 rows: the official gather; 4 × 21 > 30: score every row
        idx = torch.randint(0, 30, (4, k + 1), generator=g)
        want = [[float(bank[j] @ v[i]) for j in idx[i].tolist()] for i in range(4)]
        torch.testing.assert_close(critic(bank, v, idx), torch.tensor(want), rtol=1e-5, atol=1e-5)
