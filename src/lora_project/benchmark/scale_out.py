"""`benchmark --scaling ADDRESS`: the same train-batch on one local CPU and on a Ray cluster, timed.

A throwaway project (a temporary folder) gets ``datasets`` small datasets of real text (slices of
Tiny Shakespeare and of Project Gutenberg children's books from ``../shared/data`` when it is
there, else text from the project's own grammars) and one fixed recipe: ``steps`` optimizer steps
of 8 x 128 tokens per adapter, one thread, no MLflow tracking of the adapter runs (so that the
figure measures training and Ray, not the tracking store). Its datasets are prepared and
tokenized and the model converted first, untimed. Then, in this process:

1. local: `train-batch` (training/batch.py) on one CPU: ``training.threads=1``, the base loaded once;
2. cluster: `train-batch --cluster ADDRESS` (cluster/train.py) with ``cluster.cpus_per_task=1``.

This process measures each side's wall time and counts its model loads (``load_base`` calls: here
on the local side, in the tasks on the cluster). Every task reports its phases (cluster/tasks.py:
`task_phases`); `scaling.scaling_summary` turns them into speed-up, parallel efficiency, the mean
per-task overheads and the projection. The adapters of the two sides are compared byte for byte
(DESIGN.md convention 13: equal at equal thread counts on one CPU class).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths

SCALING_STEPS = 10  # per adapter: ~1 min per task for SmolLM2-135M on one Zen 5 core (45 s of steps, 16 s of evaluation)
SCALING_DATASETS = 4
SEQ_LEN, BATCH_SIZE = 128, 8
SLICE_CHARS = 100_000  # ~25k tokens: every step sees new text; 10% validation, 10% test
# (file under ../shared/data, dataset name stem, catalog format)
SHARED_SOURCES = (
    ("tinyshakespeare/input.txt", "shakespeare", "paragraphs"),
    ("children_stories/gutenberg/alice_in_wonderland_pg11.txt", "alice", "gutenberg"),
    ("children_stories/gutenberg/peter_pan_pg16.txt", "peter_pan", "gutenberg"),
    ("children_stories/gutenberg/wonderful_wizard_of_oz_pg55.txt", "oz", "gutenberg"),
    ("children_stories/gutenberg/grimms_fairy_tales_pg2591.txt", "grimm", "gutenberg"),
)
GRAMMARS = ("toddler", "kids")
_CATALOG_COLUMNS = ("name", "kind", "location", "format", "text_field", "sha256", "license", "description",
                    "options", "split", "enabled")


def shared_data_dir(paths: ProjectPaths) -> Path | None:
    """``LORA_PROJECT_SHARED_DATA``, else ``../shared/data`` beside the project, when it holds Tiny Shakespeare."""
    folder = Path(os.environ.get("LORA_PROJECT_SHARED_DATA") or paths.root / ".." / "shared" / "data")
    return folder.resolve() if (folder / SHARED_SOURCES[0][0]).is_file() else None


def _slice(text: str, index: int) -> str:
    """The index-th run of whole paragraphs of about SLICE_CHARS characters (wrapping around the text)."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    start = (index * SLICE_CHARS) % max(1, len(text) - SLICE_CHARS // 2)
    if start:
        cut = text.find("\n\n", start)
        start = cut + 2 if cut >= 0 else 0
    end = text.find("\n\n", start + SLICE_CHARS)
    return text[start:end if end >= 0 else len(text)].strip() + "\n"


def _rows(root: Path, paths: ProjectPaths, count: int, shared: Path | None) -> list[dict]:
    """The throwaway catalog's rows, writing their source files under root/data/raw/."""
    rows = []
    if shared is None:
        source = paths.config_dir / "grammars"
        if not all((source / f"{g}.yaml").is_file() for g in GRAMMARS):
            raise UserError(f"benchmark --scaling: no ../shared/data and no grammars in {source} to generate "
                            "text from; set LORA_PROJECT_SHARED_DATA to a folder with tinyshakespeare/input.txt")
        shutil.copytree(source, root / "config" / "grammars")
    for i in range(count):
        if shared is not None:
            rel, stem, fmt = SHARED_SOURCES[i % len(SHARED_SOURCES)]
            name = f"{stem}_{i // len(SHARED_SOURCES) + 1}"
            text = (shared / rel).read_text(encoding="utf-8-sig", errors="replace")
            if fmt == "gutenberg":
                from lora_project.data.extract import strip_gutenberg

                text = strip_gutenberg(text.replace("\r\n", "\n"))[0]
            target = root / "data" / "raw" / f"{name}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_slice(text, i // len(SHARED_SOURCES)), encoding="utf-8")
            rows.append({"name": name, "kind": "local", "location": f"data/raw/{name}.txt", "format": "paragraphs",
                         "description": f"{SLICE_CHARS // 1000} kB slice of ../shared/data/{rel}"})
        else:
            grammar = GRAMMARS[i % len(GRAMMARS)]
            rows.append({"name": f"{grammar}_{i + 1}", "kind": "generated", "format": "lines",
                         "location": f"config/grammars/{grammar}.yaml", "options": f"seed={i};lines=3000;dedupe=true",
                         "description": f"generated from the {grammar} grammar, seed {i}"})
    return rows


def build_project(root: Path, paths: ProjectPaths, model: str, steps: int, count: int) -> tuple[list[str], str]:
    """Write the throwaway project under `root`: config (model, recipe, catalog) and its text.
    Returns the dataset names and where their text came from."""
    import yaml

    shared = shared_data_dir(paths)
    (root / "config").mkdir(parents=True)
    rows = _rows(root, paths, count, shared)
    out = io.StringIO()
    writer = csv.DictWriter(out, _CATALOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({"license": "see ../shared/data/README.md" if shared else "CC0 (generated)",
                         "split": "0.8/0.1/0.1", "enabled": "true", **r})
    (root / "config" / "dataset_catalog.csv").write_text(out.getvalue())
    (root / "config" / "model_config.yaml").write_text(yaml.safe_dump({"model": {"source": model}}))
    recipe = {"training": {"max_steps": steps, "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "warmup_steps": 0,
                           "eval_interval": 0, "eval_max_tokens": 2048, "log_interval": steps, "threads": 1,
                           "device": "cpu"},
              "tracking": {"mlflow": False}, "cluster": {"cpus_per_task": 1}}
    (root / "config" / "training_config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    where = (f"slices of Tiny Shakespeare and Gutenberg children's books from {shared}" if shared
             else "generated from the project's grammars (no ../shared/data)")
    return [r["name"] for r in rows], where


def _precision(cfg) -> str:
    from lora_project.utils.device import cpu_has_native_bf16

    if cfg.training.precision != "auto":
        return cfg.training.precision
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _adapter_bytes(project: ProjectPaths, names: list[str]) -> dict[str, bytes]:
    return {n: (project.adapter(n) / "adapter_model.safetensors").read_bytes() for n in names}


def _check_trained(side: str, rows: list[dict]) -> None:
    bad = [r for r in rows if r["status"] != "trained"]
    if bad:
        raise UserError(f"benchmark --scaling: the {side} train-batch did not train "
                        + "; ".join(f"{r['dataset']}: {r['status']} {r['reason']}".strip() for r in bad))


def _prepare(project: ProjectPaths, names: list[str], cfg, log) -> str:
    """Untimed: the model resolved (the embedded one converted once), every dataset prepared and its
    token cache filled, as both timed sides then find them. Returns the model's name."""
    from lora_project.data.catalog import load_catalog
    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.models.base_model import load_tokenizer, resolve_model
    from lora_project.models.tokens import tokenizer_fingerprint

    ref = resolve_model(cfg.model.source, cfg.model.revision)
    tokenizer = load_tokenizer(ref)
    fp = tokenizer_fingerprint(tokenizer)
    catalog = load_catalog(project.catalog)
    for name in names:
        load_streams(project, prepare_dataset(project, name, catalog=catalog), tokenizer, fp)
    log(f"{len(names)} dataset(s) prepared and tokenized for {ref.name}")
    return ref.name


def _local_side(project: ProjectPaths, names: list[str], files: list[Path], overrides: list[str], log) -> dict:
    from lora_project.models.base_model import loads_in_this_process
    from lora_project.training.batch import train_batch_from_files
    from lora_project.training.options import RunOptions

    log(f"local: train-batch of {len(names)} adapter(s) on one CPU ...")
    loads = loads_in_this_process()
    t0 = time.perf_counter()
    summary = train_batch_from_files(project, names, files, overrides, None,
                                     RunOptions(use_mlflow=False, progress=False, overwrite=True,
                                                log=lambda m: log(f"local: {m}") if m.startswith("[") else None))
    wall = time.perf_counter() - t0
    _check_trained("local", summary["datasets"])
    per_task = [r["wall_seconds"] for r in summary["datasets"]]
    log(f"local: {wall:.1f} s")
    return {"wall_seconds": wall, "model_loads": loads_in_this_process() - loads, "task_seconds": per_task,
            "overhead_fraction": max(0.0, wall - sum(per_task)) / wall}


def _cluster_side(project: ProjectPaths, names: list[str], files: list[Path], overrides: list[str], address: str,
                  log) -> dict:
    from lora_project.benchmark.scaling import net_scheduling
    from lora_project.cluster.train import train_batch_cluster
    from lora_project.training.options import RunOptions

    log(f"cluster: train-batch of {len(names)} adapter(s) on {address} ...")
    t0, start = time.perf_counter(), time.time()
    summary = train_batch_cluster(project, names, files, overrides, None,
                                  RunOptions(use_mlflow=False, progress=False, overwrite=True, log=log), address)
    wall, end = time.perf_counter() - t0, time.time()
    _check_trained("cluster", summary["datasets"])
    workers = max(1, int(summary["cluster_cpus"] // summary["cpus_per_task"]))
    phases = net_scheduling([r["phases"] for r in summary["datasets"]], workers)
    for r, p in zip(summary["datasets"], phases):
        p["node"], p["adapter"] = r.get("node"), r["adapter"]
    # the driver's fixed cost: start or connect, probe, preparation check, before the first task and after the last
    fixed = (min(p["submitted_at"] for p in phases) - start) + max(0.0, end - max(p["recorded_at"] for p in phases))
    log(f"cluster: {wall:.1f} s on {workers} worker(s)")
    return {"wall_seconds": wall, "workers": workers, "nodes": summary["nodes"], "cpus": summary["cluster_cpus"],
            "shared_filesystem": summary["shared_filesystem"], "tasks": phases, "fixed_seconds": max(0.0, fixed),
            "model_loads": sum(p["model_loads"] for p in phases)}


def run_scaling(paths: ProjectPaths, address: str, *, model: str = "embedded", steps: int = SCALING_STEPS,
                datasets: int = SCALING_DATASETS, overrides: list[str] = (), log=print) -> dict:
    """Build the throwaway project, run both sides, compare their adapters; returns the report
    (`scaling_summary`'s fields, plus the run's setting, both sides' details and the identity check)."""
    from lora_project.benchmark.scaling import projection_same_load, scaling_summary
    from lora_project.cluster.address import parse_address, probe
    from lora_project.config import load_config
    from lora_project.utils.device import cpu_class

    if steps < 1 or datasets < 1:
        raise UserError(f"benchmark --scaling needs --steps >= 1 and --datasets >= 1 (got {steps} and {datasets})")
    probe(parse_address(address))  # a malformed or unreachable ADDRESS is refused before the local run
    with tempfile.TemporaryDirectory(prefix="lora-project-scaling-") as tmp:
        project = ProjectPaths(Path(tmp) / "project")
        names, where = build_project(project.root, paths, model, steps, datasets)
        files = [project.model_config, project.training_config]
        cfg = load_config(files, list(overrides))
        if cfg.training.threads != 1 or cfg.cluster.cpus_per_task != 1:
            raise UserError("benchmark --scaling compares one CPU with one-CPU tasks: training.threads and "
                            "cluster.cpus_per_task stay 1")
        model_name = _prepare(project, names, cfg, log)
        # the cluster side first: an address that accepts a TCP connection but is no Ray cluster (a
        # firewall or proxy answering for any host) fails in ray.init, before minutes of local training
        cluster = _cluster_side(project, names, files, list(overrides), address, log)
        theirs = _adapter_bytes(project, names)
        local = _local_side(project, names, files, list(overrides), log)
        mine = _adapter_bytes(project, names)
    tasks = cluster["tasks"]
    summary = scaling_summary(
        len(names), cluster["workers"], local["wall_seconds"], cluster["wall_seconds"],
        sum(t["training"] for t in tasks) / len(tasks), tasks, cluster["fixed_seconds"], local["model_loads"],
        cluster["model_loads"])
    adapters = {n: {"sha256_local": hashlib.sha256(mine[n]).hexdigest(),
                    "sha256_cluster": hashlib.sha256(theirs[n]).hexdigest()} for n in names}
    return {**summary, "mode": "scaling", "created": datetime.now(timezone.utc).isoformat(), "address": address,
            "model": model_name, "cpu": cpu_class(), "steps": steps, "shape": {"seq_len": SEQ_LEN,
                                                                                 "batch_size": BATCH_SIZE},
            "precision": _precision(cfg), "overrides": list(overrides), "datasets": names, "data": where,
            "identical_adapters": all(mine[n] == theirs[n] for n in names), "adapters": adapters,
            "overhead_fraction": summary["overheads_per_task"]["total"] / summary["train_seconds_per_task"],
            "projection_same_load": projection_same_load(summary),
            "local": local, "cluster": cluster}


def scaling_report_markdown(result: dict) -> str:
    """The printed report: the setting, `scaling_markdown`'s tables and the identity check."""
    from lora_project.benchmark.scaling import scaling_markdown

    cpu = result["cpu"]
    head = [f"# Scale-out benchmark {result['created']}", "",
            f"{result['tasks']} adapters of {result['model']} ({result['steps']} steps of {result['shape']['batch_size']}"
            f" x {result['shape']['seq_len']} tokens each, precision {result['precision']}; {result['data']}), "
            f"locally on one CPU and on `{result['address']}` ({result['cluster']['nodes']} node(s), "
            f"{result['cluster']['cpus']:g} CPU(s), one CPU per task, "
            f"{'shared filesystem' if result['cluster']['shared_filesystem'] else 'no shared filesystem'}). "
            f"CPU: {cpu.get('model', '?')} ({cpu.get('isa', '?')}).", ""]
    same = result["projection_same_load"]
    tail = ["", f"The same load per worker as measured ({same[0]['tasks'] // same[0]['workers']} task(s) each), "
                "against the local one-CPU time scaled to the task count:", "",
            "| projected workers | tasks | wall (s) | speed-up | efficiency |", "|---:|---:|---:|---:|---:|",
            *(f"| {r['workers']} | {r['tasks']} | {r['seconds']:.1f} | {r['speed_up']:.2f} | {r['efficiency']:.2f} |"
              for r in same),
            "", f"Adapters byte-identical between the two sides: {'yes' if result['identical_adapters'] else 'NO'} "
                f"({len(result['adapters'])} compared). Per-task overhead on the cluster: "
                f"{100 * result['overhead_fraction']:.1f}% of a task's training; the local run's time outside "
                f"its tasks (one model load): {100 * result['local']['overhead_fraction']:.1f}%."]
    return "\n".join(head) + "\n" + scaling_markdown(result) + "\n".join(tail) + "\n"


def write_scaling_report(paths: ProjectPaths, result: dict) -> tuple[Path, Path]:
    """outputs/metrics/benchmark_scaling_<time>.{json,md}."""
    from lora_project.utils.io_utils import atomic_write_text, write_new_json

    json_path = write_new_json(paths.metrics_dir, "benchmark_scaling", result)
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, scaling_report_markdown(result))
    return json_path, md_path


def log_scaling_to_mlflow(paths: ProjectPaths, cfg, result: dict, files: list[Path]) -> str | None:
    """One run in the MLflow experiment 'benchmark' (as the other benchmark modes), run name benchmark_scaling."""
    from lora_project.utils.mlflow_utils import MlflowTracker

    tracker = MlflowTracker(paths, "benchmark", cfg.tracking.tracking_uri)
    params = {"mode": "scaling", "address": result["address"], "model": result["model"], "steps": result["steps"],
              "tasks": result["tasks"], "workers": result["workers"], "precision": result["precision"],
              "cpu": result["cpu"].get("isa", "")}
    run_id = tracker.start("benchmark_scaling", params, {"kind": "benchmark"})
    metrics = {k: result[k] for k in ("local_one_cpu_seconds", "cluster_seconds", "speed_up", "efficiency",
                                      "train_seconds_per_task", "fixed_seconds")}
    metrics.update({f"overhead_{k}_seconds": v for k, v in result["overheads_per_task"].items()})
    metrics.update(identical_adapters=float(result["identical_adapters"]),
                   model_loads_local=result["model_loads"]["local"], model_loads_cluster=result["model_loads"]["cluster"])
    tracker.log_metrics(metrics, step=0)
    for f in files:
        tracker.log_artifact(Path(f))
    tracker.end("FINISHED")
    return run_id


def scaling_benchmark(paths: ProjectPaths, cfg, address: str, *, model: str = "embedded", steps: int = SCALING_STEPS,
                      datasets: int = SCALING_DATASETS, overrides: list[str] = (), mlflow: bool = True,
                      log=print) -> dict:
    """`lora-project benchmark --scaling ADDRESS`: `run_scaling`, the report files, and an MLflow run
    in the project's store (when `mlflow` and the config's tracking allow)."""
    from lora_project.utils.io_utils import output_dir

    output_dir(paths.metrics_dir)  # the report goes there: checked before any measuring
    result = run_scaling(paths, address, model=model, steps=steps, datasets=datasets, overrides=overrides, log=log)
    json_path, md_path = write_scaling_report(paths, result)
    result["report"] = {"json": str(json_path), "markdown": str(md_path)}
    if cfg.tracking.mlflow and mlflow:
        result["mlflow_run_id"] = log_scaling_to_mlflow(paths, cfg, result, [json_path, md_path])
    return result
