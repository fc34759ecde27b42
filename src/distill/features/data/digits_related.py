"""``digits_related``: scikit-learn's 8x8 digits relabelled into related and unrelated tasks, for S22
(``multi_source``): source teachers are trained on one pool of images under another label map, the
target student learns the digits from a small labelled budget of a disjoint pool (the rest of that pool
is its unlabelled transfer set). No source image is ever part of the target task ("no source data").

Label maps (``labels``): ``digit`` (10 classes, the target), ``mod5`` (digit mod 5: pairs of digits
merged, closely related), ``ge5`` (digit ≥ 5) and ``parity`` (two classes each, coarser), and ``ink``
(tertiles of the image's total ink, 3 classes: unrelated to the digit's identity).

The 1,797 images are split once by ``data_seed``: ``num_test`` test, ``num_val`` validation, then the
source pool (``source_size``) and the target pool (the rest). ``pool: source`` trains on the whole source
pool; ``pool: target`` gives ``num_labeled`` labelled images of the target pool and the others
unlabelled (``transfer``). Validation and test carry the task's own labels.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from distill.core.registry import TASKS, Params
from distill.errors import RecipeError
from distill.tasks.base import ArrayDataset, TaskData, split_indices

LabelMap = Literal["digit", "mod5", "ge5", "parity", "ink"]
NUM_CLASSES: dict[str, int] = {"digit": 10, "mod5": 5, "ge5": 2, "parity": 2, "ink": 3}


class DigitsRelatedParams(Params):
    labels: LabelMap = Field("digit", description="label map: digit (target), mod5, ge5, parity, ink (unrelated)")
    pool: Literal["source", "target"] = Field("target", description="which disjoint image pool to train on")
    num_labeled: int = Field(100, ge=1, description="target pool: labelled images (the rest is the transfer set)")
    source_size: int = Field(500, ge=10, description="images in the source pool")
    num_val: int = Field(200, ge=0)
    num_test: int = Field(597, ge=10)
    data_seed: int = 0


def relabel(digit: Tensor, images: Tensor, labels: str, ink_edges: Tensor) -> Tensor:
    """The label map applied to digit labels (``ink`` uses the images and fixed tertile edges)."""
    if labels == "digit":
        return digit
    if labels == "mod5":
        return digit % 5
    if labels == "ge5":
        return (digit >= 5).long()
    if labels == "parity":
        return digit % 2
    if labels == "ink":
        return torch.bucketize(images.flatten(1).sum(1), ink_edges)
    raise RecipeError(f"digits_related: unknown label map {labels!r}")


@TASKS.register("digits_related", "8x8 digits under related label maps (source pool) / few labels (target pool), S22", DigitsRelatedParams)
def build_digits_related(p: DigitsRelatedParams) -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    digit = torch.tensor(d.target, dtype=torch.long)
    n = len(digit)
    target_size = n - p.num_test - p.num_val - p.source_size
    if target_size < p.num_labeled:
        raise RecipeError(f"digits_related: {n} images leave {target_size} for the target pool, fewer than "
                          f"num_labeled={p.num_labeled}; lower source_size, num_val or num_test")
    te, va, src, tgt = split_indices(n, [p.num_test, p.num_val, p.source_size, target_size], p.data_seed)
    ink = x.flatten(1).sum(1)
    edges = torch.quantile(ink, torch.tensor([1 / 3, 2 / 3]))  # over all images: one map for every split
    y = relabel(digit, x, p.labels, edges)
    if p.pool == "source":
        train, transfer = ArrayDataset(x[src], y[src]), None
    else:
        train, transfer = ArrayDataset(x[tgt[: p.num_labeled]], y[tgt[: p.num_labeled]]), ArrayDataset(x[tgt[p.num_labeled:]])
    return TaskData(train=train, val=ArrayDataset(x[va], y[va]) if p.num_val else None,
                    test=ArrayDataset(x[te], y[te]), num_classes=NUM_CLASSES[p.labels], transfer=transfer,
                    meta={"labels": p.labels, "pool": p.pool})


build_digits_related.default_student = {"arch": "cnn2d", "width": 8, "depth": 3}  # type: ignore[attr-defined]
