"""Baselines of seed 000: online logistic regression, a one-hidden-layer MLP, and LinUCB.

Initialisation and arithmetic follow the origin (``RandomState(0)`` weights, plain SGD with L2
weight decay, LinUCB with an explicit inverse per arm), so the seed's numbers reproduce exactly.
"""

from __future__ import annotations

import numpy as np


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - np.max(scores))
    return e / np.sum(e)


class LogReg:
    """Multinomial logistic regression trained by SGD: W -= lr (x (p - y)^T + wd W), b -= lr (p - y)."""

    name = "LogReg"

    def __init__(self, d: int, k: int, *, lr: float = 0.05, wd: float = 1e-4) -> None:
        if d < 1 or k < 2:
            raise ValueError(f"need d >= 1 and k >= 2, got d={d}, k={k}")
        self.d, self.k, self.lr, self.wd = d, k, lr, wd
        self.W = np.random.RandomState(0).randn(d, k) * 0.01
        self.b = np.zeros(k)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(x @ self.W + self.b)

    def predict(self, x: np.ndarray) -> int:
        return int(np.argmax(self.predict_proba(x)))

    def update(self, x: np.ndarray, y: int) -> None:
        ds = self.predict_proba(x)
        ds[y] -= 1.0
        gW = np.outer(x, ds) + self.wd * self.W
        self.W -= self.lr * gW
        self.b -= self.lr * ds


class MLP:
    """tanh MLP with one hidden layer of ``h`` units, Glorot-uniform init, SGD with weight decay."""

    def __init__(self, d: int, k: int, *, h: int = 32, lr: float = 0.01, wd: float = 1e-5) -> None:
        if d < 1 or k < 2 or h < 1:
            raise ValueError(f"need d >= 1, k >= 2, h >= 1, got d={d}, k={k}, h={h}")
        self.d, self.k, self.h, self.lr, self.wd = d, k, h, lr, wd
        self.name = f"MLP({h})"
        rng = np.random.RandomState(0)
        lim1 = np.sqrt(6 / (d + h))
        lim2 = np.sqrt(6 / (h + k))
        self.W1 = rng.uniform(-lim1, lim1, size=(d, h))
        self.b1 = np.zeros(h)
        self.W2 = rng.uniform(-lim2, lim2, size=(h, k))
        self.b2 = np.zeros(k)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hidden = np.tanh(x @ self.W1 + self.b1)
        return hidden, _softmax(hidden @ self.W2 + self.b2)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x)[1]

    def predict(self, x: np.ndarray) -> int:
        return int(np.argmax(self.predict_proba(x)))

    def update(self, x: np.ndarray, y: int) -> None:
        hidden, ds = self._forward(x)
        ds[y] -= 1.0
        gW2 = np.outer(hidden, ds) + self.wd * self.W2
        dz1 = (1.0 - hidden * hidden) * (self.W2 @ ds)
        gW1 = np.outer(x, dz1) + self.wd * self.W1
        self.W2 -= self.lr * gW2
        self.b2 -= self.lr * ds
        self.W1 -= self.lr * gW1
        self.b1 -= self.lr * dz1


class LinUCB:
    """Disjoint LinUCB: per arm a ridge model on features [x, 1]; pull argmax theta.f + alpha sqrt(f A^-1 f).

    Ties go to the lowest arm index."""

    def __init__(self, d: int, n_arms: int, *, alpha: float = 0.8, lam: float = 1.0) -> None:
        if d < 1 or n_arms < 2 or lam <= 0 or alpha < 0:
            raise ValueError(f"need d >= 1, n_arms >= 2, lam > 0, alpha >= 0; got {d}, {n_arms}, {lam}, {alpha}")
        self.n_arms, self.alpha = n_arms, alpha
        self.name = f"LinUCB(alpha={alpha})"
        self.A = [lam * np.eye(d + 1) for _ in range(n_arms)]
        self.b = [np.zeros(d + 1) for _ in range(n_arms)]

    @staticmethod
    def _features(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, [1.0]])

    def select(self, x: np.ndarray) -> int:
        f = self._features(x)
        best_arm, best_ucb = 0, -1e9
        for arm in range(self.n_arms):
            A_inv = np.linalg.inv(self.A[arm])
            ucb = (A_inv @ self.b[arm]) @ f + self.alpha * np.sqrt(f @ A_inv @ f)
            if ucb > best_ucb:
                best_arm, best_ucb = arm, ucb
        return best_arm

    def update(self, x: np.ndarray, arm: int, reward: float) -> None:
        f = self._features(x)
        self.A[arm] += np.outer(f, f)
        self.b[arm] += reward * f
