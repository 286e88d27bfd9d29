"""Connecting the driver to Ray, and checking the nodes before any work is sent.

`connect` probes the address with a socket timeout (address.py) before ``ray.init``, so an
unreachable cluster is one error line within seconds; ``local:N`` starts a temporary cluster of
N x cluster.cpus_per_task CPUs. The dashboard stays off and the object store small (the
payloads are prepared token files and adapters, megabytes); worker output does not reach the
driver's terminal (`log_to_driver=False`): each task returns its log, which the experiment keeps.

`check_nodes` runs one probe task pinned to each alive node and compares lora-project, torch,
peft and Ray versions with the driver's; it also says whether every node sees a marker file the
driver wrote into the project folder (``cluster.shared_filesystem: auto``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from lora_project.cluster.address import ClusterAddress, probe
from lora_project.errors import UserError

LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # payloads are token files and adapters: megabytes
PROBE_TIMEOUT_S = 120.0  # a node's first task starts a worker process (imports torch): seconds to a minute


@contextmanager
def connect(address: ClusterAddress, cpus_per_task: int):
    """Ray connected for the block (and shut down after); yields the `ray` module. Whatever Ray prints
    meanwhile (a lost node's notice) goes to stderr: stdout carries the command's --json object."""
    probe(address)
    with contextlib.redirect_stdout(sys.stderr):
        import ray

        with _connected(ray, address, cpus_per_task):
            yield ray


@contextmanager
def _connected(ray, address: ClusterAddress, cpus_per_task: int):
    kwargs = {"log_to_driver": False, "logging_level": "WARNING"}
    # ray.init replaces the SIGTERM handler with one that exits at once; the command's own handler
    # (utils/interrupts.py) is put back, so SIGTERM ends the runs KILLED as Ctrl-C does
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address.kind == "local":
        # a temporary cluster of this machine talks over loopback only
        # address="local": a new cluster of our own, even when another Ray instance runs on this machine
        # (without it, ray.init joins the newest one it finds, e.g. another local:N run's)
        kwargs.update(address="local", num_cpus=address.tasks * cpus_per_task, include_dashboard=False,
                      object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1")
        ray.init(**kwargs)
    else:
        if address.kind == "gcs" and address.host in ("127.0.0.1", "localhost", "::1"):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a cluster on this machine's loopback: join it there
        try:
            ray.init(address=address.ray_address, **kwargs)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"cannot join the Ray cluster at {address.ray_address}: {first}") from None
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield ray
    finally:
        ray.shutdown()


def driver_versions() -> dict:
    from lora_project.cluster.tasks import versions

    return versions()


@contextmanager
def shared_marker(root: Path):
    """A file in the project folder that a worker on a shared filesystem can see."""
    marker = root / "outputs" / f".cluster-marker-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    try:
        yield marker
    finally:
        marker.unlink(missing_ok=True)


def check_nodes(ray, marker: Path | None) -> list[dict]:
    """Probe every alive node (versions, CPU class, marker visible); a version mismatch is a UserError."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lora_project.cluster.tasks import probe_node

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe_task = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    refs = [probe_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(marker) if marker else None) for n in nodes]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    if pending:
        raise UserError(f"{len(pending)} of {len(refs)} Ray node(s) did not answer the version probe within "
                        f"{PROBE_TIMEOUT_S:.0f} s")
    found = ray.get(ready)
    mine = driver_versions()
    for info in found:
        for pkg, version in mine.items():
            theirs = info["versions"].get(pkg)
            if theirs != version:
                raise UserError(f"node {info['node']} has {pkg} {theirs}, the driver {pkg} {version}: every node "
                                "needs the same code and packages (docs/cluster.md)")
    for n, info in zip(nodes, found):
        info["cpus"] = n.get("Resources", {}).get("CPU", 0)
    return found


def storage_mode(setting: str, nodes: list[dict]) -> bool:
    """True: shared filesystem. 'auto' asks whether every node with CPUs saw the driver's marker."""
    if setting in ("true", "false"):
        return setting == "true"
    workers = [n for n in nodes if n["cpus"] > 0] or nodes
    return all(n["sees_marker"] for n in workers)
