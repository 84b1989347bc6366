"""Check before allocating: ``bktrain`` derives a model's size and least FLOPs from its config and
refuses over a ceiling before the model exists (issue 23's attack: a 538M-parameter config with
``flops = 1`` took the service to 3.18 GB).  Unit tests of the estimate, and the attack rerun
against a real kernel and service (the service's memory is read from the OS)."""

from __future__ import annotations

import psutil
import pytest

from bklm.train import Trainer, TrainConfig
from bklm import corpus as corpus_mod
from kernel import errors
from services.bktrain import estimate as E
from tests.support import client_fixture, kernel_fixture, service_block

#: The issue's 538,210,528-parameter config.
HUGE = {"model": {"d_model": 2048, "n_layers": 4, "n_heads": 16, "n_experts": 8}, "batch": 4, "eval_windows": 8}
SMALL = {
    "model": {"d_model": 32, "n_seq": 16, "n_layers": 3, "n_heads": 4, "n_experts": 2},
    "batch": 4,
    "eval_windows": 8,
}


def test_the_estimate_counts_parameters_without_allocating_and_bounds_from_below():
    rss = psutil.Process().memory_info().rss
    huge = E.estimate(TrainConfig.from_dict(HUGE))
    assert huge.params == 538_210_528
    assert huge.state_bytes == 16 * huge.params
    assert psutil.Process().memory_info().rss - rss < 200 << 20  # meta tensors: no storage
    cfg = TrainConfig.from_dict(SMALL)
    small = E.estimate(cfg)
    trainer = Trainer(cfg, corpus_mod.load(None, limit_bytes=60_000))
    assert small.params == sum(p.numel() for p in trainer.model.parameters())
    report = trainer.step()
    assert small.step_flops <= report.flops  # a lower bound of what a step really costs
    assert small.step_flops <= trainer.step_flops_bound()
    _, eval_flops = trainer.evaluate()
    assert small.eval_flops <= eval_flops


def test_check_refuses_over_each_ceiling_with_the_reason():
    est = E.estimate(TrainConfig.from_dict(HUGE))
    with pytest.raises(errors.Refused) as info:
        E.check(est, {"flops": 1}, available=1 << 40)
    assert info.value.detail["reason"] == "budget_too_small" and info.value.detail["needed"] == est.least_flops
    for granted, group, which in (
        ({"mem_bytes": 1 << 30}, None, "mem_bytes"),
        ({}, 1 << 30, "group"),
        ({}, None, "machine"),
    ):
        with pytest.raises(errors.Refused) as info:
            E.check(est, granted, group_limit=group, available=1 << 30 if which == "machine" else 1 << 40)
        assert info.value.detail["reason"] == "memory_exceeded" and info.value.detail["which"] == which
    E.check(E.estimate(TrainConfig.from_dict(SMALL)), {"flops": 1e12, "mem_bytes": 1 << 30})


kern = kernel_fixture(service_block("bktrain", "services.bktrain"), heartbeat=0.5, liveness=6)
client = client_fixture("bktrain")


def _service_rss(client) -> int:
    pid = next(c["pid"] for c in client.stats()["children"] if c["name"] == "bktrain")
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


@pytest.mark.system
def test_the_538m_attack_with_one_flop_allocates_nothing(client):
    before = _service_rss(client)
    client.open_job("one-flop", {"flops": 1})
    with pytest.raises(errors.Refused) as info:
        client.call(
            "bktrain", {"run": "attack", "steps": 1, "config": HUGE, "corpus_limit_bytes": 60_000}, job="one-flop"
        )
    assert info.value.detail["reason"] == "budget_too_small"
    assert _service_rss(client) - before < 256 << 20  # the attack took 3.18 GB before
    # a grant of memory below the model's training state is refused up front too
    client.open_job("small-mem", {"mem_bytes": 64 << 20})
    with pytest.raises(errors.Refused) as info:
        client.call(
            "bktrain", {"run": "attack2", "steps": 1, "config": HUGE, "corpus_limit_bytes": 60_000}, job="small-mem"
        )
    assert info.value.detail["reason"] == "memory_exceeded" and info.value.detail["which"] == "mem_bytes"
    assert _service_rss(client) - before < 256 << 20
    # mem_bytes is a kind of the budget kinds table: a request may set its own ceiling
    with pytest.raises(errors.Refused) as info:
        client.call("bktrain", {"run": "attack3", "steps": 1, "config": HUGE, "corpus_limit_bytes": 60_000},
                    budget={"mem_bytes": 64 << 20})
    assert info.value.detail["reason"] == "memory_exceeded" and info.value.detail["which"] == "mem_bytes"
