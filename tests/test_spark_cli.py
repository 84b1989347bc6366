"""``python -m spark chat`` as a reca client on a private kernel (``--launch``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lm import chains
from spark.__main__ import parse_question
from tests.support import REPO


def test_chat_answers_shows_the_trace_and_reports_a_stopped_tape():
    lines = '17+25*3, 40+12*7\nnot a question\n[["PUSH", 1], ["JMP", 1]]\n/exit\nnever read\n'
    out = subprocess.run(
        [sys.executable, "-m", "spark", "chat", "--launch", "--show-trace", "--tape-steps", "3000"],
        input=lines,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "PLAN  25*3" in text and "CHECK 40+84=124: ok" in text
    assert "answer: [92, 124]" in text
    assert "error: 'not a question' is not of the form a+b*c" in text
    assert "stopped: budget_exceeded step_budget" in text and "(3000 steps)" in text
    # the integration model answered through the decode service, as it does in process
    assert f"spark: {_spark_answer('Q:17+25*3,40+12*7;')}  " in text
    assert text.count("spark: ") == 1  # the one question's answer (not the JSON tape)


def _spark_answer(prompt: str) -> str:
    from lm import tokenizer
    from lm.engine import Engine
    from lm.evaluate import answer_budget
    from spark import procedural

    items = [chains.Item(17, 25, 3), chains.Item(40, 12, 7)]
    eng = Engine(procedural.load(), num_blocks=64)
    sid = eng.start(tokenizer.encode(prompt))
    eng.generate(sid, answer_budget(items))
    return tokenizer.decode(eng.tokens(sid))[len(prompt) :]


def test_questions_parse_to_tapes_or_raise():
    tape = parse_question("1+2*3")
    assert tape[-1] == "HALT" and ["PUSH", 2] in tape
    with pytest.raises(ValueError):
        parse_question("1+2")
    with pytest.raises(ValueError):
        parse_question(", ".join(["1+2*3"] * 6))


@pytest.mark.timeout(600)
def test_eval_writes_json_against_the_dense_baseline(tmp_path):
    out_path = tmp_path / "results.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "spark",
            "eval",
            "--launch",
            "--batch-size",
            "2",
            "--runs",
            "2",
            "--dim",
            "4",
            "--codewords",
            "8",
            "--output",
            str(out_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    res = json.loads(out_path.read_text())
    assert res["schema"] == "spark.eval/1" and len(res["runs"]) == 2
    run = res["runs"][0]
    assert run["vm_correct"] == run["vm_tapes"] == 2
    assert res["vm_steps_billed"] == res["vm_steps_run"] > 0
    assert run["codebook_linear_bytes"] < run["dense_linear_bytes"]
    assert set(res["summary"]["dense_loss"]) == {"median", "min", "max"}
    assert res["model"] == "spark" and run["spark_bytes"] < 0.5 * run["dense_bytes"]
    assert 0 <= run["spark_chains_verified"] <= 2 and 0 <= run["dense_chains_verified"] <= 2
    assert run["spark_served_ms_per_token"] > 0 and 0 <= run["spark_token_acc"] <= 1
    # a repeated question reuses its prompt's whole KV blocks from the prefix cache
    assert run["spark_repeat_prompt_saved_fraction"] > 0 and run["spark_prefix_hit_rate"] > 0
