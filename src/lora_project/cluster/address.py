"""`--cluster ADDRESS`: what it names, and whether anything answers there (before Ray is imported).

ADDRESS is one of

* ``auto``: a running cluster, from ``RAY_ADDRESS`` or the address file ``ray start`` leaves
  (``<ray temp dir>/ray_current_cluster``);
* ``ray://HOST:PORT``: Ray Client (the head's client server, port 10001 by default);
* ``HOST:PORT``: a head node's GCS address, as ``ray start --head`` prints it;
* ``local:N``: a temporary cluster in this process's machine that runs N tasks at once.

`probe` opens a TCP connection with a timeout, so that an unreachable cluster is one error line
within seconds instead of Ray's own minute of retries.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_project.errors import UserError

PROBE_TIMEOUT_S = 3.0  # one TCP connect; Ray's own start-up retries far longer
MAX_LOCAL_TASKS = 1024
DEFAULT_CLIENT_PORT = 10001

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})$")


@dataclass(frozen=True)
class ClusterAddress:
    """A parsed --cluster ADDRESS: kind 'local' (tasks = N), 'client' (ray://) or 'gcs' (a head node)."""

    kind: str
    text: str
    host: str | None = None
    port: int | None = None
    tasks: int | None = None

    @property
    def ray_address(self) -> str | None:
        """What ray.init gets as its address (None: start a local cluster)."""
        if self.kind == "local":
            return None
        if self.kind == "client":
            return f"ray://{self.host}:{self.port}"
        return f"{self.host}:{self.port}"


def _host_port(text: str, given: str, default_port: int | None = None) -> tuple[str, int]:
    m = _HOST_PORT.match(text)
    if not m and default_port is not None and re.match(r"^[A-Za-z0-9][A-Za-z0-9.-]*$", text):
        return text, default_port
    if not m:
        raise UserError(f"--cluster {given!r}: expected auto, ray://HOST:PORT, HOST:PORT or local:N")
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise UserError(f"--cluster {given!r}: port must be 1 to 65535, got {port}")
    return m.group(1).strip("[]"), port


def ray_address_file() -> Path:
    """Where `ray start --head` records the address of the cluster it started."""
    tmp = os.environ.get("RAY_TMPDIR") or "/tmp"  # Ray's default temp root on Linux
    return Path(tmp) / "ray" / "ray_current_cluster"


def parse_address(text: str, environ: dict | None = None) -> ClusterAddress:
    """Parse ADDRESS (see the module docstring); `auto` is resolved here to the address it names."""
    env = os.environ if environ is None else environ
    given = text
    text = text.strip()
    if text.startswith("local:"):
        n = text[len("local:"):]
        if not n.isdigit() or not 1 <= int(n) <= MAX_LOCAL_TASKS:
            raise UserError(f"--cluster {given!r}: local:N needs N from 1 to {MAX_LOCAL_TASKS} (tasks at once)")
        return ClusterAddress("local", text, tasks=int(n))
    if text == "auto":
        found = (env.get("RAY_ADDRESS") or "").strip()
        origin = "RAY_ADDRESS"
        if not found:
            f = ray_address_file()
            found = f.read_text().strip() if f.is_file() else ""
            origin = str(f)
        if not found or found == "auto":
            raise UserError("--cluster auto: no running cluster found (set RAY_ADDRESS to HOST:PORT or "
                            "ray://HOST:PORT, or start one with `ray start --head`)")
        if found.startswith("local:"):
            raise UserError(f"--cluster auto: {origin} names {found!r}, not a running cluster")
        resolved = parse_address(found, env)
        return ClusterAddress(resolved.kind, f"auto ({origin}: {found})", resolved.host, resolved.port)
    if text.startswith("ray://"):
        host, port = _host_port(text[len("ray://"):], given, DEFAULT_CLIENT_PORT)
        return ClusterAddress("client", text, host, port)
    if "://" in text:
        raise UserError(f"--cluster {given!r}: only ray:// addresses are understood "
                        "(or auto, HOST:PORT, local:N)")
    host, port = _host_port(text, given)
    return ClusterAddress("gcs", text, host, port)


def probe(address: ClusterAddress, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse an address where nothing accepts a TCP connection within `timeout` seconds."""
    if address.kind == "local":
        return
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else (exc.strerror or str(exc))
        raise UserError(f"cannot reach the Ray cluster at {address.host}:{address.port} "
                        f"(--cluster {address.text}): {why} within {timeout:g} s") from None


def scratch_root() -> Path:
    """Node-local scratch for tasks that train without the shared project folder."""
    return Path(os.environ.get("LORA_PROJECT_SCRATCH") or tempfile.gettempdir())
