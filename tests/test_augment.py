"""Batch augmentations (distill.tasks.augment): shapes, identities, invariants, seeding."""

from __future__ import annotations

import pytest
import torch

from distill.tasks.augment import gaussian_noise, random_resized_crop, random_shift, random_view, self_mix


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(6, 40), (4, 7, 9)])
def test_shapes_dtypes_and_seeding(shape):
    x = torch.randn(*shape, generator=_gen(1))
    for fn in (lambda g: random_shift(x, 3, g), lambda g: random_resized_crop(x, (0.5, 1.0), g),
               lambda g: gaussian_noise(x, 0.1, g), lambda g: random_view(x, generator=g),
               lambda g: self_mix(x, x + 1, g)[0]):
        a, b = fn(_gen(5)), fn(_gen(5))
        assert a.shape == x.shape and a.dtype == x.dtype
        assert torch.equal(a, b)  # same generator state, same view
    assert not torch.equal(random_view(x, generator=_gen(5)), random_view(x, generator=_gen(6)))
    torch.manual_seed(3)  # the global RNG (what the engine seeds and checkpoints) is used by default
    a = random_view(x)
    torch.manual_seed(3)
    assert torch.equal(a, random_view(x))


def test_identities():
    x = torch.randn(5, 40, generator=_gen(2))
    im = torch.randn(3, 8, 8, generator=_gen(3))
    for v in (x, im):
        assert torch.equal(random_shift(v, 0), v)
        assert torch.allclose(random_resized_crop(v, (1.0, 1.0)), v, atol=1e-5)
        assert torch.equal(gaussian_noise(v, 0.0), v)
        mixed, kept = self_mix(v, v)
        assert torch.equal(mixed, v) and ((kept >= 0) & (kept <= 1)).all()


def test_shift_is_a_circular_roll_per_sample():
    x = torch.arange(3 * 10, dtype=torch.float32).view(3, 10)
    out = random_shift(x, 4, _gen(0))
    for i in range(3):
        k = int((out[i, 0] - x[i, 0]).item()) % 10  # out[0] = x[-k]
        k = (10 - k) % 10
        assert torch.equal(out[i], torch.roll(x[i], k)), i
        assert min(k, 10 - k) <= 4
    im = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6)
    out = random_shift(im, 2, _gen(1))
    for i in range(2):  # a 2-D roll keeps every row and column intact, just moved
        assert torch.equal(out[i].flatten().sort().values, im[i].flatten().sort().values)
        assert any(torch.equal(out[i], torch.roll(im[i], (a, b), (0, 1))) for a in range(-2, 3) for b in range(-2, 3))


def test_crop_interpolates_inside_the_input():
    # linear interpolation of a window: values stay within the input's range; a linear ramp stays
    # a linear ramp with slope s * (original slope)
    ramp = torch.linspace(0.0, 1.0, 41).repeat(8, 1)
    out = random_resized_crop(ramp, (0.5, 0.9), _gen(4))
    assert (out >= -1e-6).all() and (out <= 1 + 1e-6).all()
    slope = out[:, 1:] - out[:, :-1]
    assert torch.allclose(slope, slope[:, :1].expand_as(slope), atol=1e-5)
    s = slope[:, 0] * 40  # fraction of the axis covered
    assert ((s >= 0.5 - 1e-4) & (s <= 0.9 + 1e-4)).all()
    im = torch.rand(4, 9, 9, generator=_gen(5))
    out = random_resized_crop(im, (0.6, 0.8), _gen(6))
    assert (out >= im.amin((1, 2), keepdim=True) - 1e-6).all() and (out <= im.amax((1, 2), keepdim=True) + 1e-6).all()


def test_noise_statistics():
    x = torch.zeros(200, 50)
    e = gaussian_noise(x, 0.3, _gen(7))
    assert e.mean().abs() < 0.01 and e.std().item() == pytest.approx(0.3, rel=0.03)


def test_self_mix_copies_one_contiguous_segment_or_box():
    a, b = torch.zeros(16, 40), torch.ones(16, 40)
    mixed, kept = self_mix(a, b, _gen(8))
    assert torch.allclose(1 - mixed.mean(1), kept)  # the reported λ is the fraction kept from view a
    for row in mixed:  # at most one run of copied positions
        assert int((row[1:] != row[:-1]).sum()) <= 2
    ia, ib = torch.zeros(16, 8, 8), torch.ones(16, 8, 8)
    mixed, kept = self_mix(ia, ib, _gen(9))
    assert torch.allclose(1 - mixed.flatten(1).mean(1), kept)
    for m in mixed:  # the copied positions form one rectangle
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if len(rows):
            box = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and m.sum() == box.numel()
    with pytest.raises(ValueError, match="differ in shape"):
        self_mix(a, torch.zeros(16, 39))


def test_bad_shapes_and_scales_are_errors():
    with pytest.raises(ValueError, match="batch"):
        random_shift(torch.zeros(2, 3, 4, 5), 1)
    with pytest.raises(ValueError, match="crop scale"):
        random_resized_crop(torch.zeros(2, 10), (0.0, 1.0))
