"""Shared fixtures: a throw-away project folder and a tiny Llama model built in code.

Everything runs offline: hub access is disabled before transformers is imported, MLflow
points at a SQLite file inside the temporary project.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import shutil
import signal
import subprocess as _subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; LORA_PROJECT_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED_DATA = Path(os.environ.get("LORA_PROJECT_SHARED_DATA") or REPO / ".." / "shared" / "data").resolve()

TINY_TEXT = [
    "the dog runs to the ball.", "mommy want juice.", "more cookie please.", "the cat sleeps on the bed.",
    "where ball?", "daddy go car.", "baby drink milk.", "i see a big red truck.", "bye bye doggy.",
    "the bird sings in the tree.", "we built a tall tower at school.", "my friend found a shiny shell.",
]


def build_tiny_model(folder: Path, seed: int = 0, vocab_size: int = 256) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer trained on TINY_TEXT."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """Same architecture, different weights: an adapter from one must be refused on the other."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny2") / "tiny-llama-2", seed=1)


TINY_TRAINING = """\
training:
  max_steps: 6
  batch_size: 2
  seq_len: 16
  warmup_steps: 1
  lr: 0.01
  log_interval: 2
  eval_interval: 3
  eval_max_tokens: 400
  precision: fp32
  threads: 1
tracking:
  mlflow: true
  experiment_name: tests
"""


@pytest.fixture()
def project(request, tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A fresh project root: the repo's config/ copied, the model pointed at the tiny model.

    Its MLflow store (mlruns/mlflow.db) is already created, empty, from the session's template, so
    a test pays no schema migration (~5 s on a disk). Tests whose point is the store's creation are
    marked `fresh_store` and get a project without one."""
    root = tmp_path / "proj"
    shutil.copytree(REPO / "config", root / "config")
    (root / "config" / "model_config.yaml").write_text(
        f"model:\n  source: {tiny_model_dir}\nlora:\n  r: 4\n  alpha: 8\n  dropout: 0.0\n"
        "  target_modules: [q_proj, v_proj]\n")
    (root / "config" / "training_config.yaml").write_text(TINY_TRAINING)
    # Small generated corpora keep the tiny runs fast.
    catalog = (REPO / "config" / "dataset_catalog.csv").read_text().replace("lines=6000", "lines=400")
    (root / "config" / "dataset_catalog.csv").write_text(catalog)
    monkeypatch.setenv("LORA_PROJECT_ROOT", str(root))
    monkeypatch.chdir(root)
    if request.node.get_closest_marker("fresh_store") is None:
        copy_tracking_store(request.getfixturevalue("tracking_store_template"), root / "mlruns" / "mlflow.db",
                            str(root / "mlruns" / "0"))
    return root


@pytest.fixture(scope="session")
def tracking_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once per session by MLflow itself.

    Creating one runs every schema migration with a disk sync after each statement: ~5 s on
    a disk (under 1 s on tmpfs), paid by each fresh project's first tracked run. So the template
    is made on tmpfs (/dev/shm) where there is one, then kept with the session's other files.
    """
    import tempfile

    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None) as tmp:
        made = Path(tmp) / "mlflow.db"
        client = MlflowClient(tracking_uri=f"sqlite:///{made}")
        client.search_experiments()
        shutil.copyfile(made, db)
        try:  # MLflow keeps an engine per URI: let go of the file about to be deleted
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            for uri in [u for u in SqlAlchemyStore._engine_map if u.endswith(str(made))]:
                SqlAlchemyStore._engine_map.pop(uri).dispose()
        except Exception:
            pass
    return db


def copy_tracking_store(template: Path, db: Path, default_artifacts: str) -> Path:
    """`template` copied to `db`, its Default experiment's artifact folder set to `default_artifacts`
    (where MLflow would have put it had it created the store there)."""
    import sqlite3

    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    con = sqlite3.connect(db)
    try:
        with con:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (default_artifacts,))
    finally:
        con.close()
    return db


@pytest.fixture()
def tracking_store(project, tracking_store_template) -> Path:
    """The project's MLflow store (mlruns/mlflow.db), already created by the `project` fixture: named
    by the tests that read it."""
    return project / "mlruns" / "mlflow.db"


class CliResult:
    """What `subprocess.run(..., capture_output=True, text=True)` returns, for an in-process run."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(args={self.args!r}, returncode={self.returncode})"


class _CurrentStream:
    """A stream that writes wherever sys.stdout/sys.stderr points at the time of the write.

    Logging handlers created while a command runs in-process bind the captured stream; they
    are re-pointed here afterwards so that later output is neither lost nor mixed up.
    """

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def _text(buffer: io.BytesIO) -> str:
    # The same newline handling as subprocess.run(text=True): universal newlines.
    return buffer.getvalue().decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


def _all_loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                   if isinstance(lg, logging.Logger))]


@contextlib.contextmanager
def _process_state(args: list[str], cwd: Path | None, env: dict | None):
    """Give an in-process command what a fresh process would have, and take back what it changed.

    Restored afterwards: cwd, os.environ (the CLI sets defaults such as TOKENIZERS_PARALLELISM,
    tests pass MLFLOW_TRACKING_URI), sys.argv/stdin/stdout/stderr, the SIGINT/SIGTERM handlers
    and sys.unraisablehook (lora_project.utils.interrupts.install), warning filters, the levels
    and handlers of loggers that existed before, torch's thread count (resolve_runtime sets it)
    and the Python/NumPy/torch random states (set_seed). Module imports stay, as caches.
    """
    import numpy as np
    import torch

    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_sys = (sys.argv, sys.stdin, sys.stdout, sys.stderr, sys.unraisablehook)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_loggers = {lg: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in _all_loggers()}
    saved_threads = torch.get_num_threads()
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    out, err = io.BytesIO(), io.BytesIO()
    streams = (io.TextIOWrapper(out, encoding="utf-8", write_through=True),
               io.TextIOWrapper(err, encoding="utf-8", write_through=True))
    os.environ.update(env or {})
    if cwd is not None:
        os.chdir(cwd)
    sys.argv, sys.stdin = ["lora-project", *args], io.StringIO("")
    sys.stdout, sys.stderr = streams
    captured: dict[str, str] = {}
    try:
        with warnings.catch_warnings():
            yield captured
    finally:
        for stream in streams:
            stream.flush()
        captured.update(stdout=_text(out), stderr=_text(err))
        sys.argv, sys.stdin, sys.stdout, sys.stderr, sys.unraisablehook = saved_sys
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        os.chdir(saved_cwd)
        for key in [k for k in os.environ if k not in saved_env]:
            del os.environ[key]
        os.environ.update({k: v for k, v in saved_env.items() if os.environ.get(k) != v})
        for lg in _all_loggers():
            if lg in saved_loggers:
                level, lg.handlers[:], lg.propagate, lg.disabled = saved_loggers[lg]
                lg.setLevel(level)
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and h.stream in streams:
                    h.setStream(_CurrentStream("stdout" if h.stream is streams[0] else "stderr"))
        torch.set_num_threads(saved_threads)
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        interrupts = sys.modules.get("lora_project.utils.interrupts")
        if interrupts is not None:
            interrupts.clear_stop()


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            subprocess: bool = False):
    """Run the CLI (`lora_project.cli.main`) in this process, as a fresh process would run it.

    Returns an object like subprocess.CompletedProcess (`returncode`, `stdout`, `stderr`).
    argparse's SystemExit becomes the exit code and an uncaught exception exit 1 with its
    traceback on stderr, as the interpreter would do. `timeout` applies only to
    `subprocess=True`: a real `python -m lora_project ...` process, for the tests whose point
    is the process itself (the interpreter's exit codes, signals, entry points).
    """
    if subprocess:
        return run_cli_process(*args, cwd=cwd, env=env, timeout=timeout)
    from lora_project.cli import main

    with _process_state(list(args), cwd, env) as captured:
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    return CliResult(list(args), code, captured["stdout"], captured["stderr"])


def run_cli_process(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m lora_project ...` as a real subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return _subprocess.run([sys.executable, "-m", "lora_project", *args], cwd=cwd, env=full_env,
                           capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *fragments: str) -> None:
    """Exit 2, exactly one stderr line starting with 'error:', naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    err = [line for line in lines if line.startswith("error:")]
    assert len(err) == 1, proc.stderr
    for f in fragments:
        assert f in err[0], (f, err[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
