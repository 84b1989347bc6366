"""The scch service's opt-in near-miss hook (``--near-miss``): a miss whose canonical key is not
cached is answered from a similar cached subgoal only after verification; without the flag the
solver answers as before."""

import argparse

import pytest

from services.scch.service import ScchService


class _Ctx:
    """What ``_solve`` reads of a request context: the job's grants and the charges."""

    def __init__(self) -> None:
        self.granted: dict = {}
        self.charged: dict = {}

    def charge(self, **amounts: float) -> None:
        for k, v in amounts.items():
            self.charged[k] = self.charged.get(k, 0.0) + v


async def _service(near_miss: bool) -> ScchService:
    svc = ScchService()
    parser = argparse.ArgumentParser()
    svc.add_arguments(parser)
    svc.configure(parser.parse_args(["--admit-min", "0"] + (["--near-miss"] if near_miss else [])))
    await svc.setup()
    return svc


@pytest.mark.parametrize("near_miss", [True, False])
async def test_near_miss_hook(near_miss):
    svc = await _service(near_miss)
    try:
        cache = svc.cache_for("alice")
        first = await svc._solve(_Ctx(), cache, {"kind": "integrate", "expr": "sin(x)**2", "var": "x"}, True)
        assert first["hit"] is False
        ctx = _Ctx()
        out = await svc._solve(ctx, cache, {"kind": "integrate", "expr": "1 - cos(x)**2", "var": "x"}, True)
        if near_miss:
            assert out.get("near_miss") is True and "solver_calls" not in ctx.charged
            assert "canonical" not in out  # only wire-safe fields
        else:
            assert "near_miss" not in out and ctx.charged.get("solver_calls") == 1
    finally:
        await svc.teardown()
