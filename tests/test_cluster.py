"""`--cluster ADDRESS` (Ray scale-out): arguments and config in the fast tier (no Ray started);
byte-identity with a local train-batch, faults and storage modes on real Ray clusters on loopback
in the slow tier (tiny models, a few steps each)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, assert_user_error, run_cli

ONE_CPU = ["--set", "cluster.cpus_per_task=1"]  # the tiny projects train with training.threads: 1

# --- fast: parsing, config, refusals before Ray ---------------------------------------------------


def test_address_forms_parse():
    from lora_project.cluster.address import parse_address

    a = parse_address("local:3")
    assert (a.kind, a.tasks, a.ray_address) == ("local", 3, None)
    a = parse_address("ray://head.example:10001")
    assert (a.kind, a.host, a.port, a.ray_address) == ("client", "head.example", 10001, "ray://head.example:10001")
    assert parse_address("ray://head").port == 10001
    a = parse_address("127.0.0.1:6379")
    assert (a.kind, a.ray_address) == ("gcs", "127.0.0.1:6379")
    a = parse_address("auto", {"RAY_ADDRESS": "ray://10.1.2.3:10001"})
    assert (a.kind, a.host, a.port) == ("client", "10.1.2.3", 10001) and "RAY_ADDRESS" in a.text


@pytest.mark.parametrize("bad, words", [
    ("local:0", "local:N needs N from 1"), ("local:x", "local:N"), ("http://h:1", "only ray://"),
    ("h:99999", "port must be 1 to 65535"), ("", "expected auto"), ("a b", "expected auto")])
def test_bad_addresses_are_one_line(project, bad, words):
    proc = run_cli("train-batch", "--all", "--cluster", bad, cwd=project)
    assert_user_error(proc, words)


def test_auto_without_a_cluster_is_one_line(project, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray"))
    assert_user_error(run_cli("train-batch", "--all", "--cluster", "auto", *ONE_CPU, cwd=project), "no running cluster found")


def test_unreachable_cluster_is_one_line_within_10_s(project, monkeypatch):
    """Nothing listens on the port: refused by the socket probe, before Ray is imported."""
    with socket.socket() as s:  # a free loopback port, closed again: nothing accepts there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    t0 = time.perf_counter()
    proc = run_cli("train-batch", "--all", "--no-progress", "--cluster", "auto", *ONE_CPU, cwd=project)
    assert time.perf_counter() - t0 < 10
    assert_user_error(proc, "cannot reach the Ray cluster", f"127.0.0.1:{port}")
    proc = run_cli("train-batch", "--all", "--no-progress", "--cluster", f"ray://127.0.0.1:{port}", *ONE_CPU,
                   cwd=project)
    assert_user_error(proc, "cannot reach the Ray cluster")


def test_cluster_config_section_is_validated(project):
    for setting, words in (("cluster.cpus_per_task=0", "cluster.cpus_per_task: must be >= 1"),
                           ("cluster.max_retries=-1", "cluster.max_retries: must be >= 0"),
                           ("cluster.shared_filesystem=maybe", "cluster.shared_filesystem: 'maybe' is not one of"),
                           ("cluster.cpu_per_task=2", "did you mean 'cpus_per_task'")):
        assert_user_error(run_cli("train-batch", "--all", "--cluster", "local:1", "--set", setting, cwd=project),
                          words)
    from lora_project.config import load_config

    cfg = load_config([project / "config" / "training_config.yaml"], ["cluster.shared_filesystem=true"])
    assert cfg.cluster.shared_filesystem == "true"  # YAML's boolean read as the choice


def test_explicit_threads_that_differ_from_cpus_per_task_are_refused(project):
    # the tiny config sets training.threads: 1; the cluster default is 2 CPUs per task
    assert_user_error(run_cli("train-batch", "--all", "--no-progress", "--cluster", "local:1", cwd=project),
                      "training.threads=1 differs from cluster.cpus_per_task=2")
    assert_user_error(run_cli("train-batch", "--all", "--fused", "--cluster", "local:1", cwd=project),
                      "--fused")


def test_cluster_settings_are_not_part_of_the_recipe():
    """A checkpoint or an up-to-date adapter does not depend on where it was trained."""
    from lora_project.config import build_config, recipe_fields

    a = build_config({"cluster": {"cpus_per_task": 1}})
    b = build_config({"cluster": {"cpus_per_task": 4, "shared_filesystem": False}})
    assert recipe_fields(a) == recipe_fields(b) and not any(k.startswith("cluster.") for k in recipe_fields(a))


def test_ray_is_not_imported_without_cluster(project):
    """The CLI and a command without --cluster never load Ray (start-up time stays as it was)."""
    code = ("import sys, runpy\n"
            "from lora_project.cli import build_parser, main\n"
            "build_parser()\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'parser'\n"
            "rc = main(['config', '--explain'])\n"
            "assert rc == 0\n"
            "try:\n"
            "    main(['train-batch', '--all', '--cluster', 'local:0'])\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 2\n"
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
            "print('RAY', len(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORA_PROJECT_ROOT": str(project)})
    assert "RAY 0" in proc.stdout, proc.stderr[-2000:]


def test_the_board_reads_cluster_runs_from_the_progress_files_the_driver_writes(project, capsys):
    """The driver's side of a cluster task (no Ray needed): the adapter lock and the experiment folder with
    logs/progress.json carry the driver's pid, so the web board's Train tab lists the run as RUNNING with the
    task's step and loss (not as a dead run), and reads its end state; the overall bar counts every task's steps."""
    from lora_project.cluster.progress import LiveRuns
    from lora_project.config import build_config
    from lora_project.paths import ProjectPaths
    from lora_project.ui import state as board

    paths = ProjectPaths(project)
    cfg = build_config({"training": {"max_steps": 40}})
    lines: list[str] = []
    runs = LiveRuns(paths, True, lines.append)
    runs.lock("kids", 40)
    runs.lock("toddler_data", 40)
    runs.start_bar()
    assert board.locked_adapters(paths) == {"kids": os.getpid(), "toddler_data": os.getpid()}
    assert {v["adapter"]: v["status"] for v in board.live_views(paths)} == {"kids": "STARTING",
                                                                          "toddler_data": "STARTING"}  # queued
    runs.started("kids", cfg)
    runs.log("[kids] running on 10.0.0.7")
    worker_state = {"status": "RUNNING", "pid": 999_999_999, "step": 10, "max_steps": 40, "tokens_seen": 320,
                    "train_seconds": 2.0, "loss": 4.25, "tokens_per_second": 160.0, "updated": time.time()}
    runs.progress("kids", worker_state)  # as the task's ProgressFile sends it, with the worker's pid
    view = board.adapter_view(paths, "kids")
    assert (view["status"], view["step"], view["max_steps"], view["loss"], view["pid"]) == \
        ("RUNNING", 10, 40, 4.25, os.getpid())
    assert view["eta_seconds"] == pytest.approx(6.0)  # (40 - 10) steps at 0.2 s each
    assert "RUNNING" in board.progress_line(view) and "step 10/40" in board.progress_line(view)
    assert runs.bar.n == 10 and runs.bar.total == 80
    runs.close("KILLED", "interrupted")  # Ctrl-C: the run no result was recorded into ends KILLED
    status, results, progress = board.run_status(paths.experiments_dir / "exp_001_kids")
    assert (status, results["error"], progress["pid"]) == ("KILLED", "interrupted", os.getpid())
    assert board.locked_adapters(paths) == {}
    assert not list(paths.experiments_dir.glob("exp_*_toddler_data"))  # never started: no folder
    assert lines == ["[kids] running on 10.0.0.7"]
    assert "80" in capsys.readouterr().err  # the overall bar, on stderr


# --- slow: real Ray clusters on loopback ---------------------------------------------------------------


def _adapter_bytes(project: Path) -> dict[str, bytes]:
    return {p.name: (p / "adapter_model.safetensors").read_bytes()
            for p in sorted((project / "adapters").iterdir()) if (p / "adapter_model.safetensors").is_file()}


def _local_reference(project: Path) -> dict[str, bytes]:
    proc = run_cli("train-batch", "--all", "--no-progress", "--no-mlflow", "--json", *ONE_CPU, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _adapter_bytes(project)
    assert len(ref) == 2
    return ref


def _check_runs(project: Path, summary: dict, n: int, steps: int = 6, eval_every: int = 3) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    exp = client.get_experiment_by_name("tests")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == n
    for c in children:
        assert c.info.status == "FINISHED"
        history = client.get_metric_history(c.info.run_id, "loss")
        assert [m.step for m in history] == list(range(2, steps + 1, 2))  # every logged step (log_interval 2)
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val_loss")] == \
            list(range(0, steps + 1, eval_every))
        assert c.data.params["training.max_steps"] == str(steps) and c.data.tags["cluster_node"]
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"config.yaml", "results.json", "adapter"} <= arts
        exp_dir = project / "experiments" / c.data.tags["experiment_dir"]
        res = json.loads((exp_dir / "results.json").read_text())
        assert res["status"] == "FINISHED" and res["mlflow_run_id"] == c.info.run_id
        assert (exp_dir / "logs" / "metrics.jsonl").is_file()
        meta = json.loads((Path(res["adapter_dir"]) / "lora_project.json").read_text())
        assert meta["mlflow_run_id"] == c.info.run_id and meta["experiment_dir"] == str(exp_dir)


@pytest.mark.slow
def test_local_cluster_adapters_are_byte_identical_to_local_train_batch(project, tracking_store):
    ref = _local_reference(project)
    proc = run_cli("train-batch", "--all", "--no-progress", "--json", "--overwrite", "--cluster", "local:2",
                   *ONE_CPU, "--set", "cluster.shared_filesystem=false", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert [r["status"] for r in summary["datasets"]] == ["trained", "trained"]
    assert _adapter_bytes(project) == ref
    for word in ("queued", "running on", "done on", "no shared filesystem"):
        assert word in proc.stderr, (word, proc.stderr[-2000:])
    _check_runs(project, summary, 2)


@pytest.fixture()
def loopback_cluster(monkeypatch):
    """A real multi-node Ray cluster on 127.0.0.1: a head with no CPUs and two one-CPU worker nodes."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **small})
    try:  # shut down whatever happens, also when a worker node fails to start
        workers = [cluster.add_node(num_cpus=1, **small) for _ in range(2)]
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        yield cluster, workers, small
    finally:
        cluster.shutdown()


def _stop(driver: subprocess.Popen) -> None:
    """A driver process left running by a failed test: SIGINT first (it shuts its Ray down), then kill."""
    import signal

    if driver.poll() is None:
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=45)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()


@pytest.mark.slow
def test_auto_on_a_two_node_loopback_cluster_is_byte_identical(project, tracking_store, loopback_cluster):
    """The driver runs as its own process (as in the node-removal test): the Ray state that earlier tests'
    in-process drivers leave in this process (an 821 s hang once) cannot reach it."""
    ref = _local_reference(project)
    proc = run_cli("train-batch", "--all", "--no-progress", "--json", "--overwrite", "--cluster", "auto", *ONE_CPU,
                   cwd=project, subprocess=True, timeout=240, env={"LORA_PROJECT_ROOT": str(project)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert _adapter_bytes(project) == ref
    assert "3 node(s), 2 CPU(s); shared filesystem" in proc.stderr  # auto: the nodes see the marker file
    _check_runs(project, summary, 2)


@pytest.mark.slow
def test_a_failing_adapter_is_failed_with_its_error_and_the_others_go_on(project, tracking_store):
    (project / "config" / "batch_config.yaml").write_text(
        "datasets:\n  kids:\n    lora: {target_modules: [no_such_proj]}\n")
    proc = run_cli("train-batch", "--all", "--no-progress", "--json", "--cluster", "local:1", *ONE_CPU, cwd=project)
    assert proc.returncode == 2, proc.stderr[-3000:]
    rows = {r["dataset"]: r for r in json.loads(proc.stdout)["datasets"]}
    assert rows["toddler_data"]["status"] == "trained"
    assert rows["kids"]["status"] == "failed" and "no_such_proj" in rows["kids"]["reason"]
    assert "[kids] failed on" in proc.stderr and proc.stderr.count("running on") == 2  # not retried
    assert not (project / "adapters" / "kids_lora").exists()


@pytest.mark.slow
def test_a_version_mismatch_is_refused_before_training(project, monkeypatch):
    from lora_project.cluster import connect

    real = connect.driver_versions
    monkeypatch.setattr(connect, "driver_versions", lambda: {**real(), "peft": "0.0.1"})
    proc = run_cli("train-batch", "--all", "--no-progress", "--no-mlflow", "--cluster", "local:1", *ONE_CPU,
                   cwd=project)
    assert_user_error(proc, "has peft", "the driver peft 0.0.1")
    assert not (project / "adapters").exists() or not any((project / "adapters").iterdir())


def start_driver(project: Path, *args: str) -> subprocess.Popen:
    """`lora-project ARGS` as a real driver process in `project` (its own Ray state, signals of its own)."""
    return subprocess.Popen([sys.executable, "-m", "lora_project", *args], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "LORA_PROJECT_ROOT": str(project)})


def _reference_then_driver_on_auto(project: Path, longer: list[str]) -> tuple[bytes, subprocess.Popen]:
    """toddler_data trained locally (the reference bytes), then the same config started as a
    `train-batch --cluster auto` driver process that overwrites it."""
    proc = run_cli("train-batch", "toddler_data", "--no-progress", "--no-mlflow", *ONE_CPU, *longer, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _adapter_bytes(project)
    return ref, start_driver(project, "train-batch", "toddler_data", "--no-progress", "--json", "--overwrite",
                             "--cluster", "auto", *ONE_CPU, *longer)


@pytest.mark.slow
def test_a_worker_node_removed_mid_training_is_retried_elsewhere_with_the_same_adapter(project, tracking_store,
                                                                                       loopback_cluster):
    cluster, workers, small = loopback_cluster
    longer = ["--set", "training.max_steps=150", "--set", "training.eval_interval=50"]
    ref, driver = _reference_then_driver_on_auto(project, longer)
    lines = []
    try:
        for line in driver.stderr:  # wait until the task runs, then take a worker node away
            lines.append(line)
            if "running on" in line:
                break
        time.sleep(4)  # the task is loading the model or training
        cluster.add_node(num_cpus=1, **small)  # somewhere to go
        for node in workers:
            cluster.remove_node(node, allow_graceful=False)  # the task's node is one of them
        out, err = driver.communicate(timeout=300)
    finally:
        _stop(driver)
    err = "".join(lines) + err
    assert driver.returncode == 0, err[-3000:]
    assert "retried, running on" in err, err[-3000:]
    summary = json.loads(out)
    assert summary["datasets"][0]["status"] == "trained"
    assert _adapter_bytes(project) == ref
    _check_runs(project, summary, 1, steps=150, eval_every=50)


def test_train_cluster_needs_seeds(project):
    assert_user_error(run_cli("train", "kids", "--cluster", "local:1", *ONE_CPU, cwd=project), "needs --seeds N")


@pytest.mark.slow
def test_train_seeds_on_a_local_cluster_equals_local_train_seeds(project, tracking_store):
    proc = run_cli("train", "kids", "--seeds", "2", "--no-progress", "--no-mlflow", "--json", *ONE_CPU, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _adapter_bytes(project)
    assert sorted(ref) == ["kids_s42_lora", "kids_s43_lora"]
    proc = run_cli("train", "kids", "--seeds", "2", "--overwrite", "--no-progress", "--json", "--cluster", "local:2",
                   *ONE_CPU, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["seeds"] == [42, 43] and [r["status"] for r in out["runs"]] == ["FINISHED", "FINISHED"]
    assert _adapter_bytes(project) == ref


# --- deployment recipes (scripts/cluster/) ------------------------------------------------------------

RECIPES = REPO / "scripts" / "cluster"


def _lora_project_command_lines(text: str) -> list[list[str]]:
    import re
    import shlex

    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = re.search(r"""lora-project"?\s+(.*)$""", line)
        if m:
            out.append(shlex.split(m.group(1).split(";")[0]))
    return out


def test_deployment_recipes_are_valid_and_their_commands_parse():
    import yaml

    from lora_project.cli import build_parser

    for script in ("slurm_ray.sbatch", "plain_machines.sh"):
        proc = subprocess.run(["bash", "-n", str(RECIPES / script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)
    docs = list(yaml.safe_load_all((RECIPES / "kuberay_rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["metadata"]["name"]
    pods = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
            *[g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]]
    for pod in pods:  # every pod mounts the project folder from the claim
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/project"
    commands = [_lora_project_command_lines((RECIPES / f).read_text())
                for f in ("slurm_ray.sbatch", "plain_machines.sh")]
    commands.append([job["spec"]["entrypoint"].split("lora-project", 1)[1].split()])
    parser = build_parser()
    for found in commands:
        assert found, "a recipe without a lora-project command"
        for argv in found:
            args = parser.parse_args(argv)
            assert args.command == "train-batch" and args.cluster == "auto", argv


# --- evaluate --pairs --cluster -----------------------------------------------------------------------


def test_shards_cover_every_pair_once():
    from lora_project.cluster.evaluate import shards_of

    for n, k in ((10, 3), (3, 8), (1, 1), (67, 4)):
        cuts = shards_of(n, k)
        assert cuts[0][0] == 0 and cuts[-1][1] == n and all(a < b for a, b in cuts)
        assert all(cuts[i][1] == cuts[i + 1][0] for i in range(len(cuts) - 1))
        assert max(b - a for a, b in cuts) - min(b - a for a, b in cuts) <= 1


def test_evaluate_cluster_is_for_pairs_only(project):
    assert_user_error(run_cli("evaluate", "--dataset", "kids", "--cluster", "local:1", cwd=project), "--pairs only")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "blimp").is_dir(), reason="../shared/data/blimp is absent")
def test_evaluate_pairs_in_shards_gives_the_single_process_decisions(project):
    blimp = SHARED_DATA / "blimp"
    trained = run_cli("train", "kids", "--no-progress", "--no-mlflow", "--json", cwd=project)
    assert trained.returncode == 0, trained.stderr[-2000:]
    common = ["evaluate", "--pairs", str(blimp), "--limit", "4", "--adapter", "adapters/kids_lora", "--json",
              "--no-progress", *ONE_CPU]
    local = run_cli(*common, cwd=project)
    assert local.returncode == 0, local.stderr[-2000:]
    common.remove("--no-progress")
    shards = run_cli(*common, "--cluster", "local:2", cwd=project)
    assert shards.returncode == 0, shards.stderr[-2000:]
    a, b = json.loads(local.stdout), json.loads(shards.stdout)
    assert "in 2 shard(s)" in shards.stderr and b["pairs"] == a["pairs"] == 67 * 4
    for label in ("base", "kids_lora"):
        assert b["models"][label]["decisions"] == a["models"][label]["decisions"]
        assert b["models"][label]["macro_accuracy"] == a["models"][label]["macro_accuracy"]
    assert b["difference"]["kids_lora"]["paired"] == a["difference"]["kids_lora"]["paired"]


def _wait_for(lines: list, stream, needle: str) -> None:
    for line in stream:  # the driver's progress lines, until one says `needle`
        lines.append(line)
        if needle in line:
            return
    raise AssertionError(f"the driver ended before {needle!r}:\n" + "".join(lines)[-3000:])


def _wait_for_steps(project: Path, adapter: str, driver, timeout: float = 90.0) -> dict:
    """The progress.json the driver writes for a running cluster task, once it says a step was trained."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        for f in (project / "experiments").glob(f"exp_*_{adapter}/logs/progress.json"):
            try:
                state = json.loads(f.read_text())
            except ValueError:
                continue
            if (state.get("step") or 0) >= 1:
                return state
        time.sleep(0.2)
    raise AssertionError(f"no training step of {adapter} within {timeout} s (driver exit {driver.poll()})")


@pytest.mark.slow
def test_ctrl_c_at_the_driver_cancels_the_tasks_and_a_rerun_finishes_only_what_is_missing(project, tracking_store):
    """SIGINT at a real driver process while a task trains: the task is cancelled, its run ends KILLED (experiment
    folder and MLflow child run, with its history so far, and its interrupt checkpoint), the parent run KILLED, exit
    130 as a local Ctrl-C, nothing in adapters/ but the adapter trained before; a rerun with --resume trains only
    the missing adapter, from that checkpoint."""
    import signal

    from mlflow.tracking import MlflowClient

    # kids: the default 6 steps, trained beforehand (up to date); toddler_data: long enough to be interrupted while
    # it trains. 400 steps once were, but the tiny model trains 400 steps in 1.2 s on a fast machine, so the
    # SIGINT arrived after training (run KILLED, no interrupt checkpoint): 4,000 steps, about 12 s there
    max_steps = 4000
    (project / "config" / "batch_config.yaml").write_text(
        f"datasets:\n  toddler_data:\n    training: {{max_steps: {max_steps}, eval_interval: {max_steps // 2}}}\n")
    proc = run_cli("train-batch", "kids", "--no-progress", "--no-mlflow", *ONE_CPU, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kids = (project / "adapters" / "kids_lora" / "adapter_model.safetensors").read_bytes()
    driver = start_driver(project, "train-batch", "--all", "--no-progress", "--cluster", "local:2", *ONE_CPU)
    lines: list[str] = []
    try:
        _wait_for(lines, driver.stderr, "[toddler_data] running on")
        state = _wait_for_steps(project, "toddler_data", driver)  # the driver's progress file: the task trains
        assert state["pid"] == driver.pid and state["status"] == "RUNNING" and state["max_steps"] == max_steps
        t0 = time.perf_counter()
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=120)
        stop_seconds = time.perf_counter() - t0
    finally:
        _stop(driver)
    err = "".join(lines) + err
    assert driver.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err[-3000:]
    assert "1 task(s)" in err and "kids" not in err.split("task(s)")[1].split("interrupted")[0]  # kids not sent
    assert "[toddler_data] killed on" in err, err[-3000:]
    assert stop_seconds < 40, stop_seconds
    # nothing half-written: the adapter trained before, no other folder or temporary
    assert sorted(p.name for p in (project / "adapters").iterdir()) == ["kids_lora"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.status for r in parent] == ["KILLED"]
    assert [r.info.status for r in children] == ["KILLED"], err[-3000:]  # the interrupted run, none RUNNING
    killed = children[0]
    assert killed.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert client.get_metric_history(killed.info.run_id, "loss")  # its history up to the interruption
    exp = project / "experiments" / killed.data.tags["experiment_dir"]
    res = json.loads((exp / "results.json").read_text())
    assert res["status"] == "KILLED" and res["mlflow_run_id"] == killed.info.run_id
    # the rerun trains only what is missing (here locally: a second cluster start would double the test's time;
    # the project folder it reads is the same, and cluster adapters equal local ones in the identity tests)
    # the task returned its interrupt checkpoint, recorded beside its experiment folder and naming the project's
    # run: --resume continues it in that folder and run, each loss step once
    ckpts = sorted((project / "outputs" / "checkpoints" / exp.name).glob("step_*"))
    assert len(ckpts) == 1 and json.loads((ckpts[0] / "state.json").read_text())["mlflow_run_id"] == killed.info.run_id
    again = run_cli("train-batch", "--all", "--resume", "--no-progress", "--json", *ONE_CPU, cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {exp.name} from step {int(ckpts[0].name[5:])}" in again.stderr, again.stderr[-3000:]
    rows = {r["dataset"]: r["status"] for r in json.loads(again.stdout)["datasets"]}
    assert rows == {"kids": "skipped", "toddler_data": "trained"}
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == max_steps
    assert (project / "adapters" / "kids_lora" / "adapter_model.safetensors").read_bytes() == kids
    assert sorted(p.name for p in (project / "adapters").iterdir()) == ["kids_lora", "toddler_data_lora"]
