"""Strict configuration (issue 25): an unknown key anywhere is an error naming the key, the table
and the file; every enum-like setting is validated; the decision log is kept unless a config says
``decision_log = false`` explicitly, and ``status`` says which."""

from __future__ import annotations

import pytest
import zmq

from clients import Client
from clients.__main__ import render_status
from kernel import __main__ as kmain
from kernel.config import SCHEMA, TABLES, ConfigError, load, parse, schema_rows
from tests.support import KernelProcess, service_block


def write(tmp_path, text: str) -> str:
    path = tmp_path / "my.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "text, key, table",
    [
        ("[kernel]\ndecisionlog = 'x'\n", "decisionlog", "[kernel]"),
        ("[supervisor]\nintensity = 3\nperiod = 2\n", "period", "[supervisor]"),
        ("[auth]\nkey = 'k'\n", "key", "[auth]"),
        ("[limits]\nmax_pause = 3\n", "max_pause", "[limits]"),
        ("[[service]]\nname = 'echo'\nmodule = 'services.echo'\nreplica = 2\n", "replica", "[[service]] #0 (echo)"),
    ],
)
def test_unknown_key_names_key_table_and_file(tmp_path, text, key, table):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(path, runtime="/tmp/r")
    message = str(exc.value)
    assert repr(key) in message and table in message and path in message


@pytest.mark.parametrize(
    "doc, where",
    [
        ({"kernel": {"fsync": "sometimes"}}, "[kernel].fsync"),
        ({"service": [{"name": "e", "module": "m", "restart": "sometimes"}]}, "restart"),
        ({"kernel": {"decision_log": True}}, "[kernel].decision_log"),
        ({"kernel": {"heartbeat_s": "fast"}}, "[kernel].heartbeat_s"),
        ({"kernel": {"liveness": 0}}, "[kernel].liveness"),
        ({"service": [{"name": "e", "module": "m", "nice": 40}]}, "nice"),
        ({"service": [{"name": "e", "module": "m", "cpus": ["0"]}]}, "cpus"),
        ({"nonsense": {}}, "nonsense"),
        ({"enforce": {"weights": {"alice": 1e-9}}}, "weights.alice"),  # DRR would spin ~1e9 rotations per pop
    ],
)
def test_every_setting_is_typed_and_ranged(doc, where):
    with pytest.raises(ConfigError, match=__import__("re").escape(where)):
        parse(doc, runtime="/tmp/r", source="my.toml")


def test_decision_log_is_kept_unless_explicitly_false():
    assert parse({}, runtime="/r").decision_log == "/r/decisions.jsonl"
    assert parse({"kernel": {"endpoint": "ipc://{runtime}/k.sock"}}, runtime="/r").decision_log == "/r/decisions.jsonl"
    assert parse({"kernel": {"decision_log": False}}, runtime="/r").decision_log is None
    assert load(None, runtime="/r").decision_log == "/r/decisions.jsonl"


def test_the_schema_is_one_declarative_table():
    rows = schema_rows()
    assert len(rows) == len(SCHEMA) and {s.table for s in SCHEMA} == set(TABLES)
    assert all(r["key"] and r["type"] and r["meaning"] for r in rows)
    keys = [(s.table, s.key) for s in SCHEMA]
    assert len(keys) == len(set(keys))
    # the embedded default uses only keys of the schema (it loads) and every table but [[service]]
    # lists keys the schema knows
    assert load(None, runtime="/r").services


def test_log_level_is_validated():
    parser = kmain._parser()
    assert parser.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "verbose"])


@pytest.mark.system
@pytest.mark.parametrize("log", [True, False])
def test_status_says_whether_there_is_a_decision_log(log):
    extra = {} if log else {"decision_log": False}
    k = KernelProcess(service_block("echo", "services.echo"), kernel_extra=extra)
    try:
        with Client(k.endpoint, timeout=30, retries=0, context=zmq.Context.instance()) as c:
            stats = c.stats()
        durability = stats["durability"]
        if log:
            assert durability["decision_log"].endswith("decisions.jsonl") and durability["replay"]
            assert "DECISION LOG  /" in render_status(stats)
        else:
            assert durability["decision_log"] is None and not durability["replay"]
            assert "DECISION LOG  off" in render_status(stats)
    finally:
        k.stop()


def test_enforce_table_and_service_ceilings_are_in_the_schema():
    cfg = parse({"enforce": {"backend": "signals", "kill_grace_ms": 500}}, runtime="/r")
    assert cfg.enforce_backend == "signals" and cfg.kill_grace_ms == 500.0
    for doc, where in (
        ({"enforce": {"backend": "magic"}}, "[enforce].backend"),
        ({"enforce": {"grace": 1}}, "'grace'"),
        ({"service": [{"name": "a", "module": "m", "mem_bytes": 5}]}, "mem_bytes"),
    ):
        with pytest.raises(ConfigError, match=__import__("re").escape(where)):
            parse(doc, runtime="/r", source="my.toml")


def test_a_service_refuses_an_unknown_log_level():
    import subprocess
    import sys

    from clients.launch import REPO

    out = subprocess.run(
        [sys.executable, "-m", "services.echo", "--log-level", "verbose"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--log-level" in out.stderr


def test_a_limits_table_without_a_newer_compute_kind_keeps_its_default():
    """A config written before a compute kind existed still starts, and the kind it leaves out is
    limited by its shipped default (never unlimited); the kinds it names keep its values."""
    from kernel.protocol import BUDGET_KINDS

    compute = [k for k, row in BUDGET_KINDS.items() if row.compute]
    cfg = parse({"limits": {"root": {"flops": 5.0}, "default": {"flops": 3.0}}})
    assert cfg.root_limits["flops"] == 5.0 and cfg.default_limits["flops"] == 3.0
    for kind in compute:
        assert 0 <= cfg.root_limits[kind] < 1e300 and 0 <= cfg.default_limits[kind] < 1e300


@pytest.mark.parametrize(
    "text, why",
    [
        (
            "[[service]]\nname = 'echo'\nmodule = 'services.echo'\n[[service]]\nname = 'echo'\nmodule = 'services.echo'\n",
            "second [[service]] of that name",
        ),
        (
            "[[service]]\nname = 'a#1'\nmodule = 'services.echo'\n[[service]]\nname = 'a'\nmodule = 'services.echo'\n"
            "replicas = 2\n",
            "a#1",
        ),
        ("[[service]]\nname = 'ec/ho'\nmodule = 'services.echo'\n", "may not contain '/'"),
    ],
)
def test_duplicate_service_names_and_slashes_are_config_errors(tmp_path, text, why):
    """Review: two [[service]] tables of one name (one child shadowed the other) and a name with
    '/' (a control topic level, a log file name) were accepted."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(path, runtime="/tmp/r")
    assert path in str(exc.value) and why in str(exc.value) and "name" in str(exc.value)


def test_two_kernels_on_os_picked_tcp_ports_run_at_once():
    """``tcp://H:0`` lets the OS pick the port; the derived control endpoint must too.  It was
    ``tcp://H:1`` (PORT + 1), a fixed port: a second such kernel (another test run on the same
    machine, or a test's second kernel) failed to start with "Address already in use"."""
    from kernel.config import default_control_for

    assert default_control_for("tcp://127.0.0.1:0") == "tcp://127.0.0.1:0"
    assert default_control_for("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5556"
    config = '[kernel]\nendpoint = "tcp://127.0.0.1:0"\nheartbeat_s = 0.2\n\n[auth]\ninsecure = true\n'
    with KernelProcess.from_config(config) as a, KernelProcess.from_config(config) as b:
        controls = set()
        for k in (a, b):
            with Client(k.endpoint, timeout=30, retries=0, context=zmq.Context.instance()) as c:
                assert "services" in c.stats()
            (line,) = [ln for ln in k.lines if ln.startswith("reca kernel control ")]
            controls.add(line.split()[-1])
        assert len(controls) == 2 and not any(c.endswith(":1") for c in controls)
