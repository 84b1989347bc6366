"""``python -m spark chat`` as a reca client on a private kernel (``--launch``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
