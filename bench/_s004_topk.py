"""seed004 section ``topk`` (C-5): per-query top-k keys vs Quest-style block-sparse selection in
kvtp, at equal budget.

The trained long-context model, held-out :mod:`lm.varref` contexts (8 variables), all blocks
resident (selection quality only; tiering does not change outputs), each variable asked once and
answered greedily.  Budget = keys attended per head and query: block-sparse with ``topk + sinks +
window`` blocks of 64 keys (:class:`lm.kvpolicy.BlockSparse`) against ``k_top`` = the same number
of keys (:class:`lm.kvpolicy.TopKKeys`), at two budgets; full attention is the reference.

Figures per policy: answer accuracy, answers equal to full attention's, and per layer and step
the blocks read — key blocks (scored or attended) and value blocks (attended); top-k must score
every key block (exact selection), block-sparse reads only its chosen blocks (their key
summaries stay on the device).  Quick: one 2k context; full: two 8k contexts.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from bench._common import Result
from lm import varref
from lm.kvpolicy import BlockSparse, FullAttention, TopKKeys
from lm.longdecode import LongDecoder, TierSpec, answer_tokens
from lm.longmodel import load

BLOCK = 64
HELDOUT_SEED = 626_262
#: budgets as (topk, sinks, window) of the block-sparse policy; top-k keys gets the same keys
BUDGETS = ((2, 1, 2), (0, 1, 2))


def _peers() -> dict:
    out: dict = {"full": FullAttention(chunk_blocks=16)}
    for topk, sinks, window in BUDGETS:
        keys = (topk + sinks + window) * BLOCK
        out[f"block-sparse {keys}"] = BlockSparse(topk=topk, sinks=sinks, window=window)
        out[f"topk-keys {keys}"] = TopKKeys(k_top=keys, chunk_blocks=16)
    return out


def _decode(model, policy, ctx, kv, names) -> dict:
    n = -(-(len(ctx.tokens) + 4 * len(names) + 8) // BLOCK)
    with LongDecoder(model, policy, TierSpec.resident(n * BLOCK, BLOCK)) as dec:
        dec.keep_selections = True
        dec.load(ctx.tokens, *kv)
        t0 = time.perf_counter()
        answers = [answer_tokens(dec, ctx.query(name)) for name in names]
        wall = time.perf_counter() - t0
        start = len(ctx.tokens)
        key_blocks, value_blocks = [], []
        for i, step in enumerate(dec.selections):
            n_blocks = -(-(start + i + 1) // BLOCK)  # blocks holding keys at that step
            for blocks in step:
                value_blocks.append(len(blocks))
                key_blocks.append(n_blocks if isinstance(policy, (FullAttention, TopKKeys)) else len(blocks))
        steps = len(dec.stalls)
    correct = [a[0] == ctx.answer(name)[0] for a, name in zip(answers, names)]
    return {
        "answers": answers, "acc": sum(correct) / len(correct), "tok_s": steps / wall,
        "key_blocks": statistics.mean(key_blocks), "value_blocks": statistics.mean(value_blocks),
    }  # fmt: skip


def run(quick: bool) -> Result:
    model = load()
    # quick: a smoke test, one 1k context and 3 of its 8 variables asked (every policy still decodes)
    length, n_ctx, asked = (1024, 1, 3) if quick else (8192, 2, 8)
    per: dict[str, list[dict]] = {name: [] for name in _peers()}
    same: dict[str, list[float]] = {name: [] for name in per}
    for c in range(n_ctx):
        ctx = varref.make_context(random.Random(HELDOUT_SEED + c), length, 8)
        names = list(ctx.values)
        random.Random(c).shuffle(names)
        names = names[:asked]
        with torch.no_grad():
            logits, keys, vals = model(torch.tensor([ctx.tokens]), return_kv=True)
        kv = (keys.numpy(), vals.numpy(), logits[0, -1])
        ref = None
        for name, policy in _peers().items():
            r = _decode(model, policy, ctx, kv, names)
            ref = r if ref is None else ref
            per[name].append(r)
            same[name].append(sum(a == b for a, b in zip(r["answers"], ref["answers"])) / len(names))
    res = Result(metrics={})
    for name, rows in per.items():
        m = {k: statistics.mean(r[k] for r in rows) for k in ("acc", "tok_s", "key_blocks", "value_blocks")}
        budget = name.split()[-1] if name != "full" else "all"
        res.table.append({
            "policy": name.split()[0], "keys/head": budget, "acc": round(m["acc"], 3),
            "same_as_full": round(statistics.mean(same[name]), 3), "key_blocks/step": round(m["key_blocks"], 1),
            "value_blocks/step": round(m["value_blocks"], 1), "tok/s": round(m["tok_s"], 1),
        })  # fmt: skip
        key = name.replace(" ", "_").replace("-", "_")
        res.metrics[f"{key}_acc"] = m["acc"]
        res.metrics[f"{key}_key_blocks"] = m["key_blocks"]
        res.metrics[f"{key}_value_blocks"] = m["value_blocks"]
        res.metrics[f"{key}_same_as_full"] = statistics.mean(same[name])
    res.notes.append(
        f"{n_ctx} held-out context(s) of {length} tokens, {asked} of 8 variables each asked once; blocks of {BLOCK}; "
        "blocks per layer and decode step; all resident, 1 thread"
    )
    return res
