#!/usr/bin/env bash
# Parallel efficiency on two one-CPU Ray worker nodes, on this machine (docs/cluster.md,
# "Measuring scale-out"): a real multi-node cluster from ray.cluster_utils (a head with no CPUs and
# two one-CPU worker nodes, each its own raylet), then `benchmark --scaling auto` against it, then
# the cluster is shut down. Run from the project folder after `make setup`; extra arguments go to
# the benchmark, e.g.  scripts/cluster/two_node_scaling.sh --json
# The nodes listen on this machine's IP address, not 127.0.0.1: Ray's driver turns a loopback
# address into that IP before connecting.
set -euo pipefail
cd "$(dirname "$0")/../.."
addr_file=$(mktemp)
.venv/bin/python - "$addr_file" <<'PY' &
import signal, sys, time
from ray.cluster_utils import Cluster

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` shuts the nodes down
small = {"object_store_memory": 128 * 2**20, "include_dashboard": False}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **small})
for _ in range(2):
    cluster.add_node(num_cpus=1, **small)
cluster.wait_for_nodes()
with open(sys.argv[1], "w") as fh:
    fh.write(cluster.address)
try:
    while True:
        time.sleep(1)
finally:
    cluster.shutdown()
PY
holder=$!
trap 'kill $holder 2>/dev/null || true; wait $holder 2>/dev/null || true; rm -f "$addr_file"' EXIT
for _ in $(seq 120); do
    [ -s "$addr_file" ] && break
    sleep 1
done
[ -s "$addr_file" ] || { echo "error: the two-node Ray cluster did not start within 120 s" >&2; exit 1; }
RAY_ADDRESS=$(cat "$addr_file") .venv/bin/lora-project benchmark --scaling auto "$@"
