"""cpcs with its ``work`` replicas on a Ray cluster: the configuration (TOML text) that runs the
``cpcs`` service on the kernel's host and the ``work`` pool as Ray-placed replicas
(``placement = "ray"``, docs/cluster.md).

Nothing in cpcs's dispatch changes: each Ray-placed replica registers as ``work@<r>`` over
tcp:// + CURVE like a local one, so cpcs sees the same per-worker names in ``mmi.stats`` and
places each task on the worker it chose.  Each replica's first PARTIAL of a task says where it runs
(``where``: the placement this config sets in the replica's environment, and its host): cpcs sends
no OS-priority orders (renice, CPU affinity) to a remote worker and its FINAL names each worker's
place.  (``status``'s ``where`` of each child has the Ray node too, but a service key -- cpcs --
does not see the supervisor's children.)"""

from __future__ import annotations

import sys

from services.cpcs.work import ENV_PLACEMENT


def config(
    keys_dir: str,
    *,
    workers: int = 4,
    local: bool = True,
    address: str | None = None,
    temp_dir: str | None = None,
    ray_cpus: int = 4,
    heartbeat_s: float = 0.5,
    liveness: int = 12,
    host: str = "127.0.0.1",
    token_path: str | None = None,
    label: str | None = None,
    replica_cpus: float | None = None,
) -> str:
    """A whole kernel config: tcp:// + CURVE kernel (keys in ``keys_dir``), a Ray cluster (a local
    one-node cluster of ``ray_cpus`` CPUs the kernel starts, or ``address``), ``workers`` Ray-placed
    ``work`` replicas (1/``workers`` CPU each, so they all fit whatever ``ray_cpus`` is) and the
    ``cpcs`` service, local.  ``host``: the address the kernel binds (Ray nodes must reach it);
    ``token_path``: the cluster's Ray token; ``label``: only nodes started with
    ``--labels reca-node=LABEL`` host the replicas; ``replica_cpus``: the Ray CPUs each replica
    reserves (default 1/``workers``; 1/2 on nodes of 1 CPU puts 2 replicas on each)."""
    if local == (address is not None):
        raise ValueError("either a local cluster or an address")
    ray = ["local = true", f"num_cpus = {int(ray_cpus)}"] if local else [f'address = "{address}"']
    if temp_dir:
        ray.append(f'temp_dir = "{temp_dir}"')
    if token_path:
        ray.append(f'token_path = "{token_path}"')
    pin = f'ray_label = "{label}"\n' if label else ""
    ray_lines = "\n".join(ray)
    return f"""[kernel]
endpoint = "tcp://{host}:0"
control = "tcp://{host}:0"
heartbeat_s = {heartbeat_s}
liveness = {liveness}
unavailable_wait_s = 5.0
decision_log = false

[supervisor]
intensity = 5
period_s = 60.0
backoff_initial_s = 0.2

[auth]
keys = "{keys_dir}"

[ray]
{ray_lines}

[[service]]
name = "work"
module = "services.cpcs.work"
placement = "ray"
replicas = {int(workers)}
ray_num_cpus = {replica_cpus if replica_cpus is not None else 1.0 / max(1, int(workers)):.4f}
env = {{ {ENV_PLACEMENT} = "ray" }}
{pin}
[[service]]
name = "cpcs"
command = ["{sys.executable}", "-m", "services.cpcs"]
"""
