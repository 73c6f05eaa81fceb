"""The relation losses (stages/train/relations.py) against values worked out by hand, the authors'
formulation, and the invariances each one claims."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.stages.train import relations as R
from kdcache.storage.errors import UsageError


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_distance_by_hand():
    # Teacher on a line at 0, 1, 3: distances 1, 3, 2, mean 2 -> psi 0.5, 1.5, 1.
    # Student at 0, 2, 3: distances 2, 3, 1, mean 2 -> psi 1, 1.5, 0.5.
    # Differences 0.5, 0, 0.5, each twice (i, j and j, i); the diagonal is 0 on both sides.
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    s = torch.tensor([[0.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    want = 4 * huber(0.5) / 9
    assert float(R.relation_loss("rkd-distance", s, t)) == pytest.approx(want, rel=1e-5)


def test_rkd_angle_by_hand():
    # Teacher: a right isosceles triangle (cosines 0 at the right angle, 1/sqrt 2 at the others).
    # Student: equilateral (cosines 0.5). Entry [j, i, k] with i == k != j is 1 on both sides;
    # i == j or k == j is 0. So only i != k, both != j differ: two entries per vertex.
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    c = 1 / math.sqrt(2)
    want = (2 * huber(0.0 - 0.5) + 4 * huber(c - 0.5)) / 27
    assert float(R.relation_loss("rkd-angle", s, t)) == pytest.approx(want, rel=1e-5)
    both = float(R.relation_loss("rkd", s, t))
    d = float(R.relation_loss("rkd-distance", s, t))
    assert both == pytest.approx(d + 2 * want, rel=1e-5)


def test_sp_by_hand():
    # G(s) = I; G(t) = [[1, 1], [1, 2]] with rows scaled to unit norm.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r2, r5 = math.sqrt(2), math.sqrt(5)
    diff = [1 - 1 / r2, -1 / r2, -1 / r5, 1 - 2 / r5]
    want = sum(d * d for d in diff) / 4
    assert float(R.relation_loss("sp", s, t)) == pytest.approx(want, rel=1e-5)


def authors_angle(e: torch.Tensor) -> torch.Tensor:
    """RKD-A's relation as the authors' code writes it: all (B, B, D) differences normalised."""
    n = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(n, n.transpose(1, 2))


def authors_distance(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)
    return d / d[d > 0].mean()


def test_the_gram_forms_equal_the_authors_formulation():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(24, 7, generator=g) * 3 + 5  # off-centre: the centring must not matter
    torch.testing.assert_close(R.angle_relation(e), authors_angle(e), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(R.distance_relation(e), authors_distance(e), atol=2e-5, rtol=1e-4)


def pair(seed=1, b=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 6, generator=g), torch.randn(b, 9, generator=g)


def rotation(d: int, seed: int = 2) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.mark.parametrize("name", ["rkd-distance", "rkd-angle", "rkd", "sp"])
def test_scaling_and_rotating_either_set_changes_nothing(name):
    s, t = pair()
    base = float(R.relation_loss(name, s, t))
    assert base > 1e-3  # unrelated sets: far from zero, so the checks below can fail
    moved = R.relation_loss(name, 7.5 * s @ rotation(6), 0.02 * t @ rotation(9, 3))
    assert float(moved) == pytest.approx(base, rel=1e-4)


@pytest.mark.parametrize("name", ["rkd-distance", "rkd-angle", "rkd"])
def test_rkd_ignores_translation(name):
    s, t = pair()
    base = float(R.relation_loss(name, s, t))
    assert float(R.relation_loss(name, s + 4.0, t - 9.0)) == pytest.approx(base, rel=1e-4)


def test_sp_is_not_translation_invariant():
    # Its Gram matrix is of raw (uncentred) features: shifting them changes the similarities.
    s, t = pair()
    assert float(R.relation_loss("sp", s + 4.0, t)) != pytest.approx(
        float(R.relation_loss("sp", s, t)), rel=1e-2
    )


@pytest.mark.parametrize("name", ["rkd-distance", "rkd-angle", "rkd", "sp"])
def test_same_relations_give_zero_and_gradients_flow(name):
    s, t = pair()
    # A student whose features are the teacher's up to scale (and, but for SP, a shift).
    shift = 0.0 if name == "sp" else 3.0
    assert float(R.relation_loss(name, 2 * t + shift, t)) == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    loss = R.relation_loss(name, s, t)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # Gradient descent on the student's features lowers the loss.
    with torch.no_grad():
        stepped = s - 0.5 * s.grad / s.grad.norm()
    assert float(R.relation_loss(name, stepped, t)) < float(loss.detach())


def test_duplicate_rows_and_tiny_batches_stay_finite():
    s, t = pair(b=5)
    s = torch.cat([s, s[:2]]).requires_grad_(True)  # two pairs at distance 0
    t = torch.cat([t, t[:2]])
    for name in R.NAMES:
        loss = R.relation_loss(name, s, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), name
        s.grad = None
    one = torch.ones(1, 4, requires_grad=True)
    loss = R.relation_loss("rkd", one, torch.ones(1, 3))
    loss.backward()  # one row relates to nothing: zero, still attached to the graph
    assert float(loss.detach()) == 0.0 and one.grad is not None


def test_features_of_any_shape_are_flattened_and_bad_inputs_refused():
    s, t = pair(b=4)
    conv = s.reshape(4, 2, 3)
    assert float(R.relation_loss("sp", conv, t)) == pytest.approx(
        float(R.relation_loss("sp", s, t))
    )
    with pytest.raises(UsageError, match="'nope'"):
        R.relation_loss("nope", s, t)
    with pytest.raises(UsageError, match="4 student rows but 3"):
        R.relation_loss("sp", s, t[:3])


def test_describe():
    assert R.describe({"relation": "sp", "gamma": 3000.0}) == "sp (gamma 3000)"
    assert R.describe({"relation": None, "gamma": 1.0}) is None
