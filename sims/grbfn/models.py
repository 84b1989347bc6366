"""Growing RBF networks (seed 000): GRBFN and GRBFN+Plastic, with growth gated by a ``GrowthGate``.

Arithmetic follows the origin code operation for operation (same expressions, same evaluation
order, same ``RandomState(0)`` initialisation), so with ``key_update="origin"`` a run reproduces the
origin's numbers bit for bit.  Units live in preallocated buffers of ``max_prototypes`` rows; rows
``[:M]`` are the live units in spawn order (removal shifts later rows up, keeping that order, which
the merge pass and ``argmin`` tie-breaking depend on).

Contract shared by both models:
* ``predict_proba(x)`` is pure (no state change); ``update(x, y)`` is one online step.
* A unit is spawned only after ``gate.reserve("prototypes", 1)`` returned True; on False the model
  does not grow and nothing else about the spawn happens (no pruning to make room).
* Invariant: ``M <= max_prototypes``; pruning never goes below ``k`` units.  A merge pass runs only
  when ``M > k`` but, as in the origin, may then fuse below ``k``.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np

from sims.grbfn.gate import PROTOTYPES, GrowthGate, UnlimitedGate

KeyUpdate = Literal["gradient", "origin"]


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - np.max(scores))
    return e / np.sum(e)


class GRBFN:
    """Growing RBF classifier: phi_j = exp(-||x - c_j||^2 / (2 sigma^2)), p = softmax(phi @ W).

    Spawns a unit at ``x`` with weight row one-hot(y) when ``max phi < min_phi_to_cover``; learns W
    and the centres by SGD on the cross-entropy; usage decays by ``usage_decay`` per step and gains
    ``0.05 phi``; at ``max_prototypes`` units the least-used one is pruned to make room.
    """

    name = "GRBFN"

    def __init__(self, d: int, k: int, *, sigma: float = 0.65, lr_w: float = 0.25,
                 lr_c: float = 0.06, wd: float = 1e-5, min_phi_to_cover: float = 0.25,
                 usage_decay: float = 0.995, max_prototypes: int = 90,
                 gate: GrowthGate | None = None, release_on_removal: bool = False,
                 name: str | None = None) -> None:
        if d < 1 or k < 2:
            raise ValueError(f"need d >= 1 and k >= 2 classes, got d={d}, k={k}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if max_prototypes <= k:
            raise ValueError(f"max_prototypes ({max_prototypes}) must exceed k ({k})")
        if not 0 < usage_decay <= 1:
            raise ValueError(f"usage_decay must be in (0, 1], got {usage_decay}")
        self.d, self.k, self.sigma = d, k, sigma
        self.lr_w, self.lr_c, self.wd = lr_w, lr_c, wd
        self.min_phi_to_cover = min_phi_to_cover
        self.usage_decay = usage_decay
        self.max_prototypes = max_prototypes
        self.gate: GrowthGate = gate if gate is not None else UnlimitedGate()
        self.release_on_removal = release_on_removal
        if name is not None:
            self.name = name
        self.t = 0
        self.spawned = 0  # units granted by the gate and added
        self.refused = 0  # spawns the gate refused
        # Units reserved from the gate and not yet released (only tracked for release_on_removal).
        self._held = 0
        cap = max_prototypes
        self._c = np.zeros((cap, d))
        self._W = np.zeros((cap, k))
        self._usage = np.zeros(cap)
        self._extra: list[str] = []  # names of further per-unit buffers (subclasses)
        rng = np.random.RandomState(0)
        self._c[:k] = rng.randn(k, d) * 0.01
        self._W[:k] = np.eye(k)
        self._usage[:k] = 1.0
        self.M = k
        self._init_rng_tail(rng)

    def _init_rng_tail(self, rng: np.random.RandomState) -> None:
        """Hook for subclasses that draw more initial parameters from the same generator."""

    # --- live views -------------------------------------------------------------------------
    @property
    def centres(self) -> np.ndarray:
        return self._c[: self.M]

    @property
    def W(self) -> np.ndarray:
        return self._W[: self.M]

    @property
    def usage(self) -> np.ndarray:
        return self._usage[: self.M]

    @property
    def n_prototypes(self) -> int:
        return self.M

    def state(self) -> dict:
        """A deep copy of everything that defines the model's future behaviour."""
        out = {"t": self.t, "M": self.M, "spawned": self.spawned, "_held": self._held}
        for buf in ["_c", "_W", "_usage", *self._extra]:
            out[buf] = getattr(self, buf)[: self.M].copy()
        return copy.deepcopy(out)

    # --- forward ----------------------------------------------------------------------------
    def _phi(self, x: np.ndarray) -> np.ndarray:
        diffs = self.centres - x
        dist2 = np.sum(diffs * diffs, axis=1)
        return np.exp(-dist2 / (2.0 * (self.sigma ** 2)))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self._phi(x) @ self.W)

    def predict(self, x: np.ndarray) -> int:
        return int(np.argmax(self.predict_proba(x)))

    # --- structure --------------------------------------------------------------------------
    def try_spawn(self, x: np.ndarray, y: int) -> bool:
        """Ask the gate for one prototype; on a grant add a unit at ``x`` voting for ``y``.

        Returns whether the model grew.  On refusal the model's state is untouched."""
        if not self.gate.reserve(PROTOTYPES, 1):
            self.refused += 1
            return False
        if self.M >= self.max_prototypes:
            self._prune()  # M > k here (max_prototypes > k), so this frees a row
        self.spawned += 1
        if self.release_on_removal:
            self._held += 1
        i = self.M
        self._c[i] = x
        self._W[i] = 0.0
        self._W[i, y] = 1.0
        self._usage[i] = 1.0
        self._spawn_extra(i, x)
        self.M += 1
        return True

    def _spawn_extra(self, i: int, x: np.ndarray) -> None:
        """Hook: initialise subclass buffers for the new unit in row ``i``."""

    def _remove(self, rows: np.ndarray) -> None:
        """Delete the units at ``rows`` (sorted), keeping the others' order."""
        keep = np.ones(self.M, dtype=bool)
        keep[rows] = False
        n_keep = int(keep.sum())
        for buf in ["_c", "_W", "_usage", *self._extra]:
            arr = getattr(self, buf)
            arr[:n_keep] = arr[: self.M][keep]
        removed = self.M - n_keep
        self.M = n_keep
        if self.release_on_removal and removed:
            back = min(removed, self._held)
            if back:
                self.gate.release(PROTOTYPES, back)
                self._held -= back

    def _prune(self) -> None:
        """Remove the least-used unit, never going below ``k`` units."""
        if self.M <= self.k:
            return
        self._remove(np.array([int(np.argmin(self.usage))]))

    # --- learning ---------------------------------------------------------------------------
    def _check_sample(self, x: np.ndarray, y: int) -> None:
        if x.shape != (self.d,):
            raise ValueError(f"x must have shape ({self.d},), got {x.shape}")
        if not 0 <= y < self.k:
            raise ValueError(f"label must be in [0, {self.k}), got {y}")

    def update(self, x: np.ndarray, y: int) -> None:
        self._check_sample(x, y)
        self.t += 1
        self.usage[:] *= self.usage_decay
        phi = self._phi(x)
        self.usage[:] += phi * 0.05
        if np.max(phi) < self.min_phi_to_cover and self.try_spawn(x, y):
            phi = self._phi(x)
        p = _softmax(phi @ self.W)
        ds = p.copy()
        ds[y] -= 1.0
        W, C = self.W, self.centres
        gW = np.outer(phi, ds) + self.wd * W
        dphi = W @ ds  # with the pre-update W, as the origin does
        dcentres = (phi[:, None] * (x - C) / (self.sigma ** 2)) * dphi[:, None]
        W -= self.lr_w * gW
        C -= self.lr_c * dcentres


class GRBFNPlastic(GRBFN):
    """GRBFN with context-key gating, Hebbian fast weights and periodic merging.

    g_j = sigmoid(gate_beta * K_j . x); s = phi * g; a mask keeps the ``gate_top`` largest s;
    scores = (phi * mask) @ (W + H); a unit is spawned when ``max s < min_phi_to_cover``.
    H <- hebb_decay H + hebb_eta (phi*mask) (x) (y - p).  Every ``merge_every`` steps units closer than
    ``r_merge`` fuse (centres and keys averaged, W and H summed).

    ``key_update="origin"`` reproduces the origin, whose key step is scaled by sum(p - y) = 0 (up to
    rounding), so its keys never learn.  ``key_update="gradient"`` (default) ascends
    sum_j c_j log g_j with c_j = (W + H)_j . (y - p), the credit unit j's vote earns on this sample:
    K_j += key_lr * (phi_j mask_j) c_j gate_beta (1 - g_j) x.  Units whose vote helps open their gate
    (stay in the top-k, suppress spawning nearby); units whose vote hurts close it.
    """

    name = "GRBFN+Plastic"

    def __init__(self, d: int, k: int, *, sigma: float = 0.7, hebb_eta: float = 0.6,
                 hebb_decay: float = 0.94, gate_beta: float = 1.2, gate_top: int = 16,
                 key_lr: float = 0.03, r_merge: float = 0.4, merge_every: int = 600,
                 key_update: KeyUpdate = "gradient", **kwargs) -> None:
        if key_update not in ("gradient", "origin"):
            raise ValueError(f"key_update must be 'gradient' or 'origin', got {key_update!r}")
        if gate_top < 1 or merge_every < 1:
            raise ValueError(f"gate_top and merge_every must be >= 1, got {gate_top}, {merge_every}")
        self.hebb_eta, self.hebb_decay = hebb_eta, hebb_decay
        self.gate_beta, self.gate_top, self.key_lr = gate_beta, gate_top, key_lr
        self.r_merge, self.merge_every = r_merge, merge_every
        self.key_update = key_update
        self.merged = 0
        super().__init__(d, k, sigma=sigma, **kwargs)

    def _init_rng_tail(self, rng: np.random.RandomState) -> None:
        cap = self.max_prototypes
        self._H = np.zeros((cap, self.k))
        self._K = np.zeros((cap, self.d))
        self._K[: self.k] = rng.randn(self.k, self.d) * 0.01
        self._extra = ["_H", "_K"]

    @property
    def H(self) -> np.ndarray:
        return self._H[: self.M]

    @property
    def K(self) -> np.ndarray:
        return self._K[: self.M]

    def _spawn_extra(self, i: int, x: np.ndarray) -> None:
        self._H[i] = 0.0
        self._K[i] = x

    def _gated(self, x: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(g, s, mask): gate values, gated activations, top-``gate_top`` mask by s."""
        g = 1.0 / (1.0 + np.exp(-self.gate_beta * (self.K @ x)))
        s = phi * g
        if self.M <= self.gate_top:
            mask = np.ones(self.M, dtype=bool)
        else:
            mask = np.zeros(self.M, dtype=bool)
            mask[np.argpartition(s, -self.gate_top)[-self.gate_top:]] = True
        return g, s, mask

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        phi = self._phi(x)
        _, _, mask = self._gated(x, phi)
        return _softmax((phi * mask) @ (self.W + self.H))

    def update(self, x: np.ndarray, y: int) -> None:
        self._check_sample(x, y)
        self.t += 1
        self.usage[:] *= self.usage_decay
        phi = self._phi(x)
        g, s, mask = self._gated(x, phi)
        if np.max(s) < self.min_phi_to_cover and self.try_spawn(x, y):
            phi = self._phi(x)
            g, s, mask = self._gated(x, phi)
        W, H, C, K = self.W, self.H, self.centres, self.K
        act = phi * mask
        p = _softmax(act @ (W + H))
        ds = p.copy()
        ds[y] -= 1.0
        gW = np.outer(act, ds) + self.wd * W
        W -= self.lr_w * gW
        dphi = ((W + H) @ ds) * mask  # with the post-update W, as the origin does
        dcentres = (phi[:, None] * (x - C) / (self.sigma ** 2)) * dphi[:, None]
        C -= self.lr_c * dcentres
        err = -ds  # y - p
        H *= self.hebb_decay
        H += self.hebb_eta * np.outer(act, err)
        if self.key_update == "origin":
            K += self.key_lr * (act[:, None] * (x - K)) * (-np.sum(ds))
        else:
            credit = (W + H) @ err
            K += (self.key_lr * self.gate_beta) * (act * credit * (1.0 - g))[:, None] * x
        self.usage[:] += s * 0.05
        if self.M > self.max_prototypes:
            self._prune()
        if self.t % self.merge_every == 0 and self.M > self.k:
            self._merge()

    def _merge(self) -> None:
        """Fuse units closer than ``r_merge``, scanning pairs (i < j) in order as the origin does:
        unit i absorbs every later unit within range of its *current* (already averaged) centre."""
        M, r2 = self.M, self.r_merge ** 2
        C, W, H, K = self.centres, self.W, self.H, self.K
        keep = np.ones(M, dtype=bool)
        for i in range(M):
            if not keep[i]:
                continue
            j0 = i + 1
            while j0 < M:
                later = np.flatnonzero(keep[j0:]) + j0
                if later.size == 0:
                    break
                close = later[np.sum((C[i] - C[later]) ** 2, axis=1) < r2]
                if close.size == 0:
                    break
                j = int(close[0])
                C[i] = 0.5 * (C[i] + C[j])
                W[i] += W[j]
                H[i] += H[j]
                K[i] = 0.5 * (K[i] + K[j])
                keep[j] = False
                j0 = j + 1
        removed = np.flatnonzero(~keep)
        if removed.size:
            self.merged += int(removed.size)
            self._remove(removed)
