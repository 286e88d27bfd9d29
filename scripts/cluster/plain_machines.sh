#!/bin/bash
# Plain machines (docs/cluster.md, "Plain machines"): run each step on the machine it names.
# Every machine has this project checked out at the same path with `make setup` done (or the
# folder on a shared filesystem), and can reach the head's port 6379.
set -euo pipefail
step="${1:-}"
case "$step" in
    head)      # on the head machine: start Ray; its CPUs run tasks too
        .venv/bin/ray start --head --port=6379 --include-dashboard=false ;;
    worker)    # on each other machine: HEAD_IP is the head machine's address
        .venv/bin/ray start --address="${HEAD_IP:?set HEAD_IP}:6379" ;;
    train)     # on the head machine: train the catalog on every machine's CPUs
        .venv/bin/lora-project train-batch --all --cluster auto ;;
    stop)      # on every machine, when done
        .venv/bin/ray stop ;;
    *)
        echo "usage: $0 head|worker|train|stop" >&2
        exit 2 ;;
esac
