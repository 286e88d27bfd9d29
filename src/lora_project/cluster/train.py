"""`train-batch --cluster ADDRESS` (and `train --seeds N --cluster`): one adapter = one Ray task.

The driver (this process):

1. validates every run's config as local train-batch does, and refuses an explicit
   ``training.threads`` that differs from ``cluster.cpus_per_task``;
2. prepares each dataset and fills its token cache, and resolves precision, the fp32 kernel and
   threads once (every task gets the same);
3. connects (address.py, connect.py), checks every node's versions, and decides the storage mode;
4. submits one task per adapter (``num_cpus=cluster.cpus_per_task``, ``max_retries=
   cluster.max_retries``, ``retry_exceptions=False``), each with the driver's `RunOptions`;
5. fetches each result as soon as its task ends (``ray.wait``), so that a later node loss cannot
   make a finished task run again, and records it (cluster/record.py). Checkpoints: cluster/resume.py.

Progress: one line per task event (queued, running on NODE, retried, done, failed, killed), an overall
bar with ETA, and the files the web board reads for a local run (the adapter lock and the experiment
folder's logs/progress.json, with the driver's pid: cluster/progress.py).

Ctrl-C or SIGTERM at the driver: the tasks still out are cancelled; a running one ends its run KILLED as a
local Ctrl-C does and returns it; the driver records it before the parent run ends KILLED (`AdapterTasks.cancel`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from lora_project.cluster.resume import drop_mirror, mirror_dir, task_checkpoint
from lora_project.errors import RunInterrupted, UserError
from lora_project.paths import ProjectPaths
from lora_project.training.options import RunOptions


def check_threads(configs: dict) -> int:
    """The CPUs of one task (cluster.cpus_per_task of the first config); an explicit training.threads
    that differs from it is refused."""
    first = next(iter(configs.values()))
    cpus = first.cluster.cpus_per_task
    for name, cfg in configs.items():
        if cfg.cluster.cpus_per_task != cpus:
            raise UserError(f"cluster.cpus_per_task differs between datasets ({cpus} and {cfg.cluster.cpus_per_task} "
                            f"for '{name}'): the cluster settings apply to the whole command")
        if cfg.training.threads not in (0, cpus):
            raise UserError(f"training.threads={cfg.training.threads} differs from cluster.cpus_per_task={cpus}: "
                            "a task's torch threads equal its CPUs; set one of them to match (or threads to 0)")
        if cfg.training.device == "cuda":
            raise UserError("training.device=cuda is not supported with --cluster yet: tasks reserve CPUs only")
    return cpus


def _project_files(paths: ProjectPaths, catalog: dict, name: str) -> dict[str, bytes]:
    """What a worker without the shared project needs to train on `name`: config/ (the catalog), the
    dataset's source (its fingerprint is checked) and its prepared folder with the token cache."""
    from lora_project.cluster.tasks import read_tree
    from lora_project.data.catalog import get_entry

    root = paths.root
    # config/ is small and holds the catalog and what generated datasets are made from (grammars)
    files = {f"config/{rel}": data for rel, data in read_tree(paths.config_dir).items()}
    entry = get_entry(catalog, name)
    processed = paths.processed(name)
    for rel, data in read_tree(processed).items():
        files[(processed / rel).relative_to(root).as_posix()] = data
    if entry.kind != "hub":
        from lora_project.data.dataset_loader import fetch_source

        src = fetch_source(paths, entry, progress=False, log=lambda m: None).resolve()
        try:
            rel = src.relative_to(root.resolve())
        except ValueError:
            raise UserError(f"dataset '{name}': its source {src} is outside the project folder; without a shared "
                            "filesystem only the project's files travel to the workers (move it under data/ "
                            "or set cluster.shared_filesystem: true)") from None
        if src.is_dir():
            for r, data in read_tree(src).items():
                files[(rel / r).as_posix()] = data
        else:
            files[rel.as_posix()] = src.read_bytes()
    return files


def _row(name: str, adapter: str, cfg) -> dict:
    return {"dataset": name, "adapter": f"{adapter}_lora", "seed": cfg.training.seed, "status": "", "reason": "",
            "steps": None, "tokens": None, "perplexity_before": None, "perplexity_after": None, "wall_seconds": None}


def resolve_for_tasks(first_cfg, cpus: int) -> tuple:
    """What the driver resolves once for every task: the base model's reference, its tokenizer and the
    tokenizer's fingerprint, the runtime (precision, `cpus` threads) and the fp32 kernel."""
    from lora_project.models.base_model import load_tokenizer, resolve_model
    from lora_project.models.kernels import fp32_kernel
    from lora_project.models.tokens import tokenizer_fingerprint
    from lora_project.utils.device import resolve_runtime

    ref = resolve_model(first_cfg.model.source, first_cfg.model.revision)
    tokenizer = load_tokenizer(ref)
    runtime = resolve_runtime("cpu", first_cfg.training.precision, cpus, first_cfg.training.malloc_reuse)
    return ref, tokenizer, tokenizer_fingerprint(tokenizer), runtime, fp32_kernel()


def train_on_cluster(paths: ProjectPaths, jobs: list[tuple], address_text: str, options: RunOptions | None = None,
                     *, run_kind: str = "batch", parent_name: str = "train-batch") -> dict:
    """Train `jobs` [(dataset, adapter name, RunConfig)] as Ray tasks at `address_text`; returns the summary
    of train-batch's shape (rows, parent run, wall time) without writing it."""
    from lora_project.cluster.address import parse_address
    from lora_project.data.catalog import load_catalog
    from lora_project.data.dataset_loader import load_streams, prepare_dataset
    from lora_project.training.batch import end_parent_run, is_up_to_date
    from lora_project.utils.mlflow_utils import MlflowTracker, resolve_tracking_uri

    options = options or RunOptions()
    log = options.log
    configs = {a: c for _, a, c in jobs}
    cpus = check_threads(configs)
    address = parse_address(address_text)
    first = jobs[0][2]
    settings = first.cluster
    t_all = time.perf_counter()
    # Everything the configs and the project can refuse, refused before connecting.
    catalog = load_catalog(paths.catalog)
    ref, tokenizer, tok_fp, runtime, kernel = resolve_for_tasks(first, cpus)
    rows, todo, prepared_by = [], [], {}
    for name, adapter, cfg in jobs:
        row = _row(name, adapter, cfg)
        rows.append(row)
        try:
            if name not in prepared_by:
                prepared = prepare_dataset(paths, name, catalog=catalog)
                load_streams(paths, prepared, tokenizer, tok_fp)  # the token cache the tasks read
                prepared_by[name] = prepared
            prepared = prepared_by[name]
            fp = prepared.stats["source_sha256"][:16] + "-" + prepared.stats["settings_sha256"][:16]
            if not options.overwrite and is_up_to_date(paths, adapter, cfg, fp, ref.fingerprint):
                row.update(status="skipped", reason="adapter up to date (same config, data and base)")
            elif paths.adapter(adapter).exists() and not options.overwrite:
                row.update(status="failed", reason=f"adapter {paths.adapter(adapter)} already exists; pass "
                                                   "--overwrite to replace it")
            else:
                todo.append((row, name, adapter, cfg))
        except UserError as exc:
            row.update(status="failed", reason=" ".join(str(exc).split()))
    log(f"{len(todo)} task(s) for {address.text}: {runtime.precision}, fp32 kernel {kernel}, {cpus} thread(s) each"
        + (f"; {len(jobs) - len(todo)} not sent (skipped or failed)" if len(todo) < len(jobs) else ""))
    uri = resolve_tracking_uri(paths, first.tracking.tracking_uri)
    live = uri if uri.startswith(("http://", "https://")) else None
    use_mlflow = options.use_mlflow and first.tracking.mlflow
    parent = MlflowTracker(paths, first.tracking.experiment_name, first.tracking.tracking_uri) if use_mlflow else None
    status = "FINISHED"
    with cluster_session(paths, address, cpus, settings.shared_filesystem, log) as (ray, shared, nodes):
        cluster_cpus = sum(n["cpus"] for n in nodes)
        try:
            if parent:
                parent.start(f"{parent_name} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}",
                             {"datasets": ",".join(dict.fromkeys(n for n, _, _ in jobs)),
                              "overwrite": options.overwrite, "cluster": address.text},
                             {"kind": parent_name, "cluster": address.text})
            _run_tasks(ray, paths, todo, options, catalog, shared, live, parent, runtime.precision, kernel, cpus,
                       settings.max_retries, first, run_kind, log)
        except (KeyboardInterrupt, RunInterrupted):
            status = "KILLED"
            raise
        finally:
            end_parent_run(parent, status, rows)
    results = {r["adapter"]: r.pop("_results") for r in rows if "_results" in r}
    return {"created": datetime.now(timezone.utc).isoformat(), "parent_run_id": parent.run_id if parent else None,
            "wall_seconds": time.perf_counter() - t_all, "cluster": address.text, "datasets": rows,
            "results": results, "nodes": len(nodes), "cluster_cpus": cluster_cpus, "cpus_per_task": cpus,
            "shared_filesystem": shared}


@contextmanager
def cluster_session(paths: ProjectPaths, address, cpus: int, shared_setting: str, log):
    """Connected to the cluster, every node's versions checked and the storage mode decided, for the
    block; yields (ray, shared filesystem or not, the nodes' probe answers with their CPUs)."""
    from lora_project.cluster.connect import check_nodes, connect, shared_marker, storage_mode

    with connect(address, cpus) as ray, shared_marker(paths.root) as marker:
        nodes = check_nodes(ray, marker)
        shared = storage_mode(shared_setting, nodes)
        log(f"cluster: {len(nodes)} node(s), {sum(n['cpus'] for n in nodes):g} CPU(s); "
            f"{'shared filesystem' if shared else 'no shared filesystem: data and results travel through Ray'}")
        yield ray, shared, nodes


CANCEL_GRACE_S = 30.0  # how long a cancelled task may take to end its run KILLED and return it


class AdapterTasks:
    """Adapters trained as Ray tasks (`tasks.train_task`, the local recipe) and recorded by the driver:
    train-batch and train --seeds submit them all at once, a sweep K at a time. With `runs` (a
    `progress.LiveRuns`), each adapter is locked from submission to its record and its run shows in the
    files the web board reads (train-batch, train --seeds); without, the record alone takes the lock."""

    def __init__(self, ray, paths: ProjectPaths, catalog: dict, shared: bool, live: str | None, parent_id: str | None,
                 precision: str, kernel: str, cpus: int, max_retries: int, log, runs=None):
        from lora_project.cluster.progress import ProgressActor
        from lora_project.cluster.tasks import train_task

        self.ray, self.paths, self.catalog, self.shared, self.live = ray, paths, catalog, shared, live
        self.parent_id, self.precision, self.kernel, self.cpus, self.max_retries = (parent_id, precision, kernel,
                                                                                    cpus, max_retries)
        self.runs = runs
        self.log = runs.log if runs is not None else log
        # on the head node, which outlives the worker nodes (a lost worker node must not take it along)
        self.progress = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(ProgressActor).remote()
        self.remote = ray.remote(train_task)
        self.shipped: dict[str, object] = {}
        self.starts: dict[str, int] = {}
        self.configs: dict[str, object] = {}
        self.resumed: dict[str, str | None] = {}  # adapter -> the project's MLflow run its task continues
        self.mirrors: dict[str, str] = {}  # adapter -> its task's folder in the shared project (cluster/resume.py)
        self.sent: dict = {}  # ref -> (submit time, the driver's seconds packing and putting its data): task phases

    def submit(self, name: str, adapter: str, cfg, options: RunOptions, run_kind: str):
        """One task training `adapter` on dataset `name` with `options` (as a local run would); its ref.
        A UserError (with `runs`: the adapter is being trained elsewhere) before anything is sent. With
        `options.resume`, an adapter with a checkpoint in the project continues it (cluster/resume.py)."""
        if self.runs is not None:
            self.runs.lock(adapter, cfg.training.max_steps)  # as a local run: one trainer per adapter
        resume = task_checkpoint(self.paths, adapter, self.shared) if options.resume else None
        if resume is not None:
            self.resumed[adapter] = resume["run_id"]
            if self.runs is not None:  # the run continues in its experiment folder
                self.runs.exp[adapter] = self.paths.experiments_dir / resume["exp_name"]
        packing = 0.0
        if name not in self.shipped:
            t_pack = time.perf_counter()
            files = _project_files(self.paths, self.catalog, name)
            self.shipped[name] = sorted(files) if self.shared else self.ray.put(files)
            packing = time.perf_counter() - t_pack
        spec = {"key": adapter, "dataset": name, "adapter": adapter, "config": cfg.to_dict(),
                "options": replace(options, adapter_name=adapter, log=print, progress=False, run_kind=run_kind,
                                   parent_run_id=self.parent_id if self.live else None, resume=resume is not None),
                "resume": resume and {k: resume[k] for k in ("exp_name", "run_id", "step")},
                "precision": self.precision, "kernel": self.kernel, "threads": self.cpus, "tracking_uri": self.live,
                "shared_root": str(self.paths.root) if self.shared else None,
                "task_dir": self.mirrors.setdefault(adapter, mirror_dir(adapter)) if self.shared else None}
        ref = self.remote.options(num_cpus=self.cpus, max_retries=self.max_retries, retry_exceptions=False).remote(
            spec, self.shipped[name], self.progress, resume and resume["files"])
        self.sent[ref] = (time.time(), packing)
        self.configs[adapter] = cfg
        self.log(f"[{adapter}] queued" + (f", resuming {resume['exp_name']} from step {resume['step']}" if resume else ""))
        return ref

    def wait(self, pending: list, timeout: float = 1.0) -> tuple[list, list]:
        """Results of the tasks that ended within `timeout` [(ref, result or None, error of a lost or
        cancelled task)], and the refs still pending; says which tasks started (or started again)
        meanwhile and, with `runs`, writes their progress."""
        ready, pending = self.ray.wait(pending, num_returns=1, timeout=timeout)
        events, states = self.ray.get(self.progress.drain.remote())
        for key, node, _task, _t in events:
            self.starts[key] = self.starts.get(key, 0) + 1
            self.log(f"[{key}] {'retried, running' if self.starts[key] > 1 else 'running'} on {node}")
            if self.runs is not None:
                self.runs.started(key, self.configs[key])
        if self.runs is not None:
            for key, state in states.items():
                self.runs.progress(key, state)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref), None))
            except self.ray.exceptions.RayError as exc:  # lost more often than max_retries, a worker crash, cancelled
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                out.append((ref, None, f"{type(exc).__name__}: {first}"))
        return out, pending

    def record(self, result: dict, adapter: str, first_cfg, overwrite: bool) -> dict:
        """Write a task's adapter, experiment folder and MLflow run into the project; its results.json. A Ctrl-C
        waits until the record is whole (folders, MLflow run and its end state)."""
        from lora_project.cluster.record import record_result
        from lora_project.training.lifecycle import adapter_lock
        from lora_project.utils.interrupts import shielded

        result["adapter"] = adapter
        if adapter in self.resumed:
            result["resume_run_id"] = self.resumed[adapter]
        drop_mirror(self.paths, self.mirrors.pop(adapter, None))  # the task ended: its result is here
        with shielded():
            if self.runs is None:
                with adapter_lock(self.paths, adapter):
                    return record_result(self.paths, result, self.parent_id, first_cfg, overwrite, self.parent_id is not None)
            res = record_result(self.paths, result, self.parent_id, first_cfg, overwrite, self.parent_id is not None,
                          self.runs.exp.get(adapter))
            if result.get("experiment_name"):
                self.runs.ended(adapter)
            else:  # the task stopped before its run began (the recipe made no experiment folder)
                self.runs.end_without_run(adapter, result["status"], result["error"] or "no run")
            return res

    def lost(self, adapter: str, error: str) -> None:
        """A task that returned no result (lost, crashed, cancelled): its started run ends KILLED or FAILED."""
        drop_mirror(self.paths, self.mirrors.pop(adapter, None))
        if self.runs is not None:
            cancelled = error.startswith("TaskCancelledError")
            self.runs.end_without_run(adapter, "KILLED" if cancelled else "FAILED",
                                      "interrupted" if cancelled else error)

    def cancel(self, pending: list) -> list:
        """Ctrl-C or SIGTERM at the driver: cancel the tasks still out. A running one gets a KeyboardInterrupt,
        ends its run KILLED (the local recipe's own clean-up) and returns it; what ends within CANCEL_GRACE_S
        is returned as `wait` returns it, for the caller to record as any other run. Whatever is still out
        after that (or after a second Ctrl-C) is killed with its worker process (``force=True``)."""
        if not pending:
            return []
        self.log(f"interrupted: cancelling {len(pending)} task(s)")
        ended, left = [], list(pending)
        try:
            for ref in pending:
                self.ray.cancel(ref, force=False)
            deadline = time.monotonic() + CANCEL_GRACE_S
            while left and time.monotonic() < deadline:
                got, left = self.wait(left, timeout=max(0.1, deadline - time.monotonic()))
                ended += got
        finally:
            for ref in left:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # ended meanwhile
                    pass
        return ended

    def phases(self, ref, result: dict) -> dict | None:
        """The task's phase times (benchmark --scaling's overheads), recorded now."""
        from lora_project.cluster.tasks import task_phases

        return task_phases(result.get("phases"), *self.sent[ref], time.time())


def _run_tasks(ray, paths, todo, options, catalog, shared, live, parent, precision, kernel, cpus, max_retries,
               first_cfg, run_kind, log) -> None:
    from lora_project.cluster.progress import LiveRuns
    from lora_project.utils.interrupts import acknowledge, check_stop

    runs = LiveRuns(paths, options.progress, log)
    end_state = ("FAILED", "the driver stopped before the task returned its run")
    refs: dict = {}
    try:
        tasks = AdapterTasks(ray, paths, catalog, shared, live, parent.run_id if parent else None, precision, kernel,
                             cpus, max_retries, log, runs)
        for row, name, adapter, cfg in todo:
            try:
                refs[tasks.submit(name, adapter, cfg, options, run_kind)] = (row, adapter, time.perf_counter())
            except UserError as exc:  # the adapter is being trained by another process
                row.update(status="failed", reason=" ".join(str(exc).split()))
                runs.log(f"[{adapter}] failed: {row['reason']}")
        runs.start_bar()
        pending = list(refs)
        try:
            while pending:
                check_stop()
                ended, pending = tasks.wait(pending)
                for ref, result, lost in ended:
                    _collect(tasks, refs[ref], ref, result, lost, parent, first_cfg, options,
                             step=len(refs) - len(pending))
        except (KeyboardInterrupt, RunInterrupted):
            acknowledge()  # the clean-up below is not torn by the same stop (a second Ctrl-C still is)
            end_state = ("KILLED", "interrupted")
            for ref, result, lost in tasks.cancel(pending):
                _collect(tasks, refs[ref], ref, result, lost, None, first_cfg, options, step=0)
            raise
        end_state = ("FAILED", "the task ended without returning its run")
    finally:
        runs.close(*end_state)


def _collect(tasks: AdapterTasks, entry: tuple, ref, result, lost, parent, first_cfg, options, step: int) -> None:
    """Record one ended task in the project; its row updated and its line logged."""
    row, adapter, t0 = entry
    log = tasks.log
    if result is None:
        tasks.lost(adapter, lost)
        if lost.startswith("TaskCancelledError"):  # cancelled before its run began: no run to record
            row.update(status="killed", reason="cancelled")
            log(f"[{adapter}] cancelled")
        else:
            row.update(status="failed", reason=lost, wall_seconds=time.perf_counter() - t0)
            log(f"[{adapter}] failed: {row['reason']}")
        return
    res = tasks.record(result, adapter, first_cfg, options.overwrite)
    row["_results"] = res
    row["phases"] = tasks.phases(ref, result)
    row["wall_seconds"] = time.perf_counter() - t0
    row["node"] = result["node"]
    if result["status"] == "FINISHED":
        row.update(status="trained", steps=res["steps"], tokens=res["tokens_seen"],
                   perplexity_before=res["metrics_before"]["perplexity"],
                   perplexity_after=res["metrics_after"]["perplexity"], experiment=res["experiment_dir"])
        log(f"[{adapter}] done on {result['node']}: validation perplexity "
            f"{row['perplexity_before']:.3f} -> {row['perplexity_after']:.3f}")
    elif result["status"] == "KILLED":
        row.update(status="killed", reason="interrupted", experiment=res.get("experiment_dir"))
        log(f"[{adapter}] killed on {result['node']}"
            + (f": run recorded KILLED in {Path(res['experiment_dir']).name}" if res.get("experiment_dir")
               else " before its run began"))
    else:
        row.update(status="failed", reason=result["error"], bug=result["bug"])
        log(f"[{adapter}] failed on {result['node']}: {result['error']}")
    if parent:
        parent.log_metrics({f"{adapter}.wall_seconds": row["wall_seconds"]} |
                           ({f"{adapter}.perplexity_after": row["perplexity_after"]}
                            if row["perplexity_after"] else {}), step=step)


def train_batch_cluster(paths: ProjectPaths, names: list[str], config_files: list[Path], overrides: list[str],
                        batch_config: Path | None, options: RunOptions, address: str, *, seeds=None,
                        name_template: str | None = None) -> dict:
    """`lora-project train-batch --cluster ADDRESS`: the same jobs as local train-batch, as Ray tasks."""
    from lora_project.config import read_yaml
    from lora_project.training.batch import check_resume, config_for, load_batch_overrides, write_summary
    from lora_project.training.seeds import check_unique, seeded_runs
    from lora_project.utils.io_utils import output_dir

    check_resume(options)
    batch_file = batch_config or (paths.config_dir / "batch_config.yaml")
    if batch_config is None and not batch_file.is_file():
        batch_file = None
    per = load_batch_overrides(batch_file, names)
    sources = [(str(f), read_yaml(f)) for f in config_files]
    configs = {n: config_for(sources, overrides, per.get(n), n) for n in names}
    jobs = [(n, a, c) for n in names for a, c in seeded_runs(n, configs[n], seeds, name_template)]
    check_unique([a for _, a, _ in jobs])
    output_dir(paths.metrics_dir)
    summary = train_on_cluster(paths, jobs, address, options)
    summary.pop("results")
    summary["report"] = write_summary(paths, summary)
    return summary


def train_seeds_cluster(paths: ProjectPaths, dataset: str, cfg, spec, options: RunOptions, address: str) -> dict:
    """`lora-project train NAME --seeds N --cluster ADDRESS`: one task per seed; the shape of local
    `train --seeds` ({dataset, seeds, runs}); a failed seed is reported after the others finished."""
    from lora_project.training.seeds import check_unique, seeded_runs

    if options.resume:
        raise UserError("--resume continues one adapter; resume each seed's adapter with --adapter-name NAME_sSEED")
    runs = seeded_runs(dataset, cfg, spec, None, options.adapter_name)
    check_unique([n for n, _ in runs])
    summary = train_on_cluster(paths, [(dataset, n, c) for n, c in runs], address, options, run_kind="single",
                               parent_name="train-seeds")
    failed = [r for r in summary["datasets"] if r["status"] != "trained"]
    if failed:
        raise UserError(f"{len(failed)} of {len(runs)} seed run(s) did not train: "
                        + "; ".join(f"{r['adapter'].removesuffix('_lora')}: {r['status']} {r['reason']}".strip()
                                    for r in failed))
    return {"dataset": dataset, "seeds": [c.training.seed for _, c in runs],
            "runs": [summary["results"][f"{n}_lora"] for n, _ in runs], "parent_run_id": summary["parent_run_id"]}
