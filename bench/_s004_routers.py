"""seed004 section ``routers`` (S-1): hash vs switch routing in bklm's MoE FFN, at equal active
parameters.

Model: bklm's Transformer baseline (``arch="transformer"``, d=32, 2 layers, 4 heads, 32-byte
windows of the Python stdlib corpus, byte vocabulary), every arm trained the same steps on the
same batches (seeded), Adam, then scored on held-out windows (modules the training split never
saw).  Arms, all with the same *active* FFN parameters per token (``k * hidden = 64``):

* ``dense``       — one expert (``n_experts=1``): a plain FFN of width 64, the peer;
* ``switch-k1``   — learned Switch gate, 4 experts of width 64, top-1, balance loss 0.01;
* ``hash-k1``     — content hash (SimHash of the block input), 4 experts of width 64;
* ``switch-k2``   — learned gate, 4 experts of width 32, top-2;
* ``hash-k2``     — content hash, 4 experts of width 32, two distinct experts per token.

Figures per arm: held-out cross-entropy (nats/byte) and next-byte accuracy; load balance on the
held-out pass (``load_balance_std``, the coefficient of variation of expert loads, mean over
layers; the least-used expert's share); total and active parameters.  Quick: 20 steps; full: 300
steps (one seed each: the shared machine's budget; ``run(seeds=...)`` takes more).
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from bench._common import Result
from bklm import corpus as bk_corpus
from bklm.model import LanguageModel, ModelConfig, parameter_count
from bklm.model import MoEFFN as BKMoE

D, LAYERS, SEQ, BATCH = 32, 2, 32, 16
#: arm -> (router, k, n_experts, ffn_mult): every arm has k * ffn_mult * D = 64 active FFN width
ARMS = {
    "dense": ("switch", 1, 1, 2),
    "switch-k1": ("switch", 1, 4, 2),
    "hash-k1": ("hash", 1, 4, 2),
    "switch-k2": ("switch", 2, 4, 1),
    "hash-k2": ("hash", 2, 4, 1),
}


def _train_and_score(arm: str, train: np.ndarray, held: torch.Tensor, steps: int, seed: int) -> dict:
    router, k, experts, mult = ARMS[arm]
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="transformer", d_model=D, n_layers=LAYERS, n_seq=SEQ, n_heads=4,
        n_experts=experts, ffn_mult=mult, router=router, router_k=k,
    )  # fmt: skip
    model = LanguageModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = torch.from_numpy(train[rng.integers(0, len(train), BATCH)])
        loss, _, _ = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, ce, out = model.loss(held[:, :-1], held[:, 1:])
    acc = (out.logits.argmax(-1) == held[:, 1:]).float().mean().item()
    moes = [m for m in model.modules() if isinstance(m, BKMoE)]
    stds = [m.router.load_balance_std(m.last_routing) for m in moes]
    least = min(float(m.router.expert_utilization(m.last_routing).min()) for m in moes)
    active = sum(p.numel() for p in model.parameters()) - sum(
        (m.experts - m.router.k) * (2 * m.d * m.hidden + m.hidden + m.d) for m in moes
    )
    return {
        "ce": ce.mean().item(), "acc": acc, "balance_std": statistics.mean(stds),
        "least_share": least, "params": parameter_count(model), "active_params": active,
    }  # fmt: skip


def run(quick: bool, seeds: tuple[int, ...] = (0,)) -> Result:
    steps, n_held = (8, 16) if quick else (300, 256)  # quick: a smoke test of every arm
    corpus = bk_corpus.load(limit_bytes=300_000)
    train = corpus.windows("train", SEQ)
    held_all = corpus.windows("heldout", SEQ)
    held = torch.from_numpy(held_all[np.random.default_rng(99).choice(len(held_all), n_held, replace=False)])
    res = Result(metrics={})
    per: dict[str, list[dict]] = {a: [] for a in ARMS}
    for seed in seeds:
        for arm in ARMS:
            per[arm].append(_train_and_score(arm, train, held, steps, seed))
    med = {a: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for a, rows in per.items()}
    for arm, m in med.items():
        res.table.append({
            "arm": arm, "router": ARMS[arm][0], "k": ARMS[arm][1], "experts": ARMS[arm][2],
            "active_params": int(m["active_params"]), "params": int(m["params"]),
            "heldout_ce": round(m["ce"], 4), "heldout_acc": round(m["acc"], 4),
            "load_balance_std": round(m["balance_std"], 4), "least_expert_share": round(m["least_share"], 4),
        })  # fmt: skip
        for key in ("ce", "acc", "balance_std"):
            res.metrics[f"{arm}_{key}"] = m[key]
    for arm in ("switch-k1", "hash-k1", "switch-k2", "hash-k2"):
        res.metrics[f"{arm}_ce_minus_dense"] = med[arm]["ce"] - med["dense"]["ce"]
    res.metrics["hash_k1_over_switch_k1_balance_std"] = med["hash-k1"]["balance_std"] / max(
        med["switch-k1"]["balance_std"], 1e-9
    )
    res.notes.append(
        f"bklm transformer d={D} L={LAYERS} seq={SEQ} batch={BATCH}, {steps} steps, seeds {list(seeds)} "
        f"(median), held-out {n_held} windows of modules never trained on; equal active FFN width 64 "
        "(k x expert width); active_params counts the gate but not the idle experts"
    )
    return res
