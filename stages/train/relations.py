"""Relation losses: what the teacher says about how samples relate, taught from stored features.

Each loss compares a relation computed within one batch from the student's pooled features
``s`` (B, Ds) with the same relation computed from the cached teacher features ``t`` (B, Dt); the
widths may differ, so no projector is needed. Under torchrun each rank relates its own batch.

- ``rkd-distance`` (Park et al., 2019, RKD-D): ``psi(a)_ij = ||a_i - a_j|| / mu(a)`` with ``mu``
  the mean distance over the pairs ``i != j``; loss = mean over all B^2 entries of
  ``huber(psi(s) - psi(t))`` (smooth L1, threshold 1). Invariant to scaling, translating and
  rotating either feature set.
- ``rkd-angle`` (RKD-A): ``psi(a)_jik = cos`` of the angle at vertex ``a_j`` between ``a_i`` and
  ``a_k``; loss = mean over all B^3 entries of ``huber(psi(s) - psi(t))``, entries with
  ``i == j`` or ``k == j`` being 0 on both sides (as in the authors' code). Invariant to scale,
  translation and rotation. Its cost grows as B^3: about 17M entries at B = 256.
- ``rkd``: ``rkd-distance + 2 * rkd-angle``, the paper's 1 : 2 weighting (its lambda_D = 25,
  lambda_A = 50 is ``--gamma 25``).
- ``sp`` (Tung and Mori, 2019, similarity preserving): ``G(a) = a a^T`` with each row scaled to
  unit L2 norm; loss = ``||G(s) - G(t)||_F^2 / B^2``. Invariant to scaling either set and to any
  rotation of its feature space (not to translation). The paper takes the flattened activation
  map; here it is the pooled vector the cache stores, and the student's tap pools the same way.

The trainer adds ``gamma * relation`` to its loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.storage.errors import UsageError

EPS = 1e-12


def _flat(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(len(a), -1).float()


def distances(a: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B) Euclidean distances between rows; exactly 0 on the diagonal. `g` is `a @ a.T`
    when the caller has it already."""
    sq = a.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * (a @ a.T if g is None else g)).clamp_min(EPS).sqrt()
    return d * (1 - torch.eye(len(a), dtype=d.dtype, device=d.device))


def distance_relation(a: torch.Tensor) -> torch.Tensor:
    """Pairwise distances over their mean off the diagonal (RKD's psi_D)."""
    a = _flat(a)
    # Centred first: distances do not change, and the Gram trick cancels less.
    d = distances(a - a.mean(0))
    pairs = len(a) * (len(a) - 1)
    return d / (d.sum() / max(1, pairs)).clamp_min(EPS)


def angle_relation(a: torch.Tensor) -> torch.Tensor:
    """(B, B, B): entry [j, i, k] is the cosine of the angle at a_j between a_i and a_k.

    From the Gram matrix of the centred rows, (a_i - a_j).(a_k - a_j) = G_ik - G_ij - G_jk + G_jj,
    so the cost is B^3 scalars rather than B^3 * D multiply-adds."""
    a = _flat(a)
    a = a - a.mean(0)
    g = a @ a.T
    d = distances(a, g)
    gd = g.diagonal()
    dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + gd[:, None, None]
    norm = d.clamp_min(EPS)
    cos = dot / (norm[:, :, None] * norm[:, None, :])
    # A degenerate pair (i == j or k == j) has no angle: 0, as normalising a zero vector gives.
    live = (d > 0).to(cos.dtype)
    return cos * live[:, :, None] * live[:, None, :]


def similarity(a: torch.Tensor) -> torch.Tensor:
    """SP's row-normalised Gram matrix (B, B)."""
    a = _flat(a)
    return F.normalize(a @ a.T, p=2, dim=1, eps=EPS)


def rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = distance_relation(t)
    return F.smooth_l1_loss(distance_relation(s), target)


def rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = angle_relation(t)
    return F.smooth_l1_loss(angle_relation(s), target)


def rkd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return rkd_distance(s, t) + 2 * rkd_angle(s, t)


def sp(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = similarity(t)
    return (similarity(s) - target).pow(2).sum() / len(s) ** 2


LOSSES = {"rkd-distance": rkd_distance, "rkd-angle": rkd_angle, "rkd": rkd, "sp": sp}
NAMES = tuple(LOSSES)


def relation_loss(name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The relation loss `name` between the student's and the teacher's features of one batch."""
    if name not in LOSSES:
        raise UsageError(f"--relation {name!r} is not one of {', '.join(NAMES)}")
    if len(student) != len(teacher):
        raise UsageError(
            f"relation loss: {len(student)} student rows but {len(teacher)} teacher rows"
        )
    if len(student) < 2:
        # One row relates to nothing; keep the graph so backward() still works.
        return student.float().sum() * 0.0
    return LOSSES[name](student, teacher.to(student.device))


def describe(settings: dict) -> str | None:
    """The relation term of a run's loss in words (the report), or None without one."""
    name = settings.get("relation")
    return f"{name} (gamma {settings.get('gamma', 1.0):g})" if name else None
