"""Shared fixtures: a throw-away project folder and a tiny Llama model built in code.

Everything runs offline: hub access is disabled before transformers is imported, MLflow
points at a SQLite file inside the temporary project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

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
def project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A fresh project root: the repo's config/ copied, the model pointed at the tiny model."""
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
    return root


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m lora_project ...` as a real subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "lora_project", *args], cwd=cwd, env=full_env,
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
