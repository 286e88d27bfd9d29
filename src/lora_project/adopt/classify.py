"""What each old file is: adapters, data formats, configs, scripts (read-only guesses, never a pickle load)."""


from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path

from lora_project.adopt._project import UserError, sha256_file

# Folders that are caches or version control: left in place as one item, never entered.

CACHE_DIRS = {"__pycache__", ".ipynb_checkpoints", ".cache", ".pytest_cache", ".mypy_cache", ".ruff_cache",
              ".git", ".hg", ".svn", ".venv", "venv", ".tox", ".nox", "node_modules", ".hypothesis",
              ".idea", ".vscode", ".eggs", "site-packages"}
LOG_DIRS = {"logs", "log", "wandb", "lightning_logs", "tensorboard", "tb_logs"}
# Temporary folders by name: tmp, tmp_run3, temp2, scratch, old, backup1, run.tmp (not "old_data").
_TEMP_RE = re.compile(r"^(tmp|temp|scratch|trash|junk)([._-].*|\d*)$|^(old|backup|bak)\d*$|.*[._-](tmp|temp)$", re.I)
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
TRAINER_PICKLES = re.compile(r"^(optimizer|scheduler|scaler|rng_state.*|training_args)\.(pt|pth|bin)$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
ADAPTER_EXTRAS = ("README.md", "trainer_state.json")
NOT_DATA_TXT = re.compile(r"^(requirements.*|constraints.*|license.*|licence.*|readme.*|changelog.*|notice.*|"
                          r"authors.*|copying.*)\.(txt|text)$", re.I)
DATA_SUFFIXES = {".txt", ".text", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet"}
SNIFF_BYTES = 256 * 1024  # how much of a data file is read to guess its format

# Old config fields and what they are called here (config/legacy notes).
FIELD_MAP = {
    "r": "lora.r", "lora_r": "lora.r", "rank": "lora.r", "lora_rank": "lora.r",
    "alpha": "lora.alpha", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules", "use_rslora": "lora.use_rslora", "bias": "lora.bias",
    "lr": "training.lr", "learning_rate": "training.lr", "batch_size": "training.batch_size",
    "per_device_train_batch_size": "training.batch_size", "train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum", "grad_accum": "training.grad_accum",
    "max_steps": "training.max_steps", "num_train_epochs": "training.epochs", "epochs": "training.epochs",
    "max_seq_length": "training.seq_len", "max_length": "training.seq_len", "seq_len": "training.seq_len",
    "block_size": "training.seq_len", "warmup_steps": "training.warmup_steps",
    "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm",
    "seed": "training.seed", "lr_scheduler_type": "training.schedule", "scheduler": "training.schedule",
    "model_name": "model.source", "model_name_or_path": "model.source", "base_model": "model.source",
    "base_model_name_or_path": "model.source", "model_id": "model.source",
    "experiment_name": "tracking.experiment_name",
    **{k: "a catalog row (lora-project catalog add)"
       for k in ("train_file", "data_path", "dataset_path", "train_data", "data_file", "dataset")},
}

# Which project command replaces an old script, judged by words in its file name.
SCRIPT_COMMANDS = (
    (("extract", "child"), "lora-project extract-children"),
    (("batch",), "lora-project train-batch"),
    (("train", "all"), "lora-project train-batch"),
    (("train",), "lora-project train"),
    (("finetune",), "lora-project train"),
    (("generate", "data"), "lora-project generate-data"),
    (("synth",), "lora-project generate-data"),
    (("extract",), "lora-project extract"),
    (("preprocess",), "lora-project prepare"),
    (("prepare",), "lora-project prepare"),
    (("clean",), "lora-project prepare"),
    (("download",), "lora-project prepare (url/hub catalog rows)"),
    (("eval",), "lora-project evaluate"),
    (("perplexity",), "lora-project evaluate"),
    (("generate",), "lora-project generate"),
    (("sample",), "lora-project generate"),
    (("inference",), "lora-project generate"),
    (("merge",), "lora-project merge"),
    (("inspect",), "lora-project inspect weights"),
    (("analy",), "lora-project inspect weights"),
    (("benchmark",), "lora-project benchmark"),
)


def _open_read(path: Path):
    """Open a file for reading; unreadable files are bad input (one line, nothing changed)."""
    try:
        return open(path, "rb")
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied (fix its permissions, or move it out of "
                        "the folder being adopted)") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _head(path: Path, n: int = SNIFF_BYTES) -> bytes:
    with _open_read(path) as fh:
        try:
            return fh.read(n)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed; an unreadable file is a UserError."""
    _open_read(path).close()
    try:
        return sha256_file(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def inspect_adapter(d: Path, by_name: dict[str, Path]) -> dict:
    """Facts about an adapter folder without loading a model or unpickling: the config, which
    weights file, the LoRA keys. A broken adapter raises UserError with the reason."""
    try:
        config = json.loads(_head(by_name["adapter_config.json"], 1 << 22).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError("adapter_config.json is not readable JSON") from None
    if not isinstance(config, dict):
        raise UserError("adapter_config.json is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"not a LoRA adapter (peft_type {config.get('peft_type')})")
    base = config.get("base_model_name_or_path") or ""
    facts = {"base_model": base, "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
             "target_modules": config.get("target_modules")}
    if "adapter_model.safetensors" in by_name:
        from safetensors import SafetensorError, safe_open

        path = by_name["adapter_model.safetensors"]
        _open_read(path).close()
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"adapter_model.safetensors is corrupt or truncated ({str(exc)[:120]})") from None
        facts["weights"] = "adapter_model.safetensors"
    elif "adapter_model.bin" in by_name:
        keys = _torch_zip_check(by_name["adapter_model.bin"])
        facts["weights"] = "adapter_model.bin"
    else:
        raise UserError("adapter_config.json without adapter_model.safetensors or adapter_model.bin")
    if keys is not None and not any(".lora_A" in k for k in keys):
        raise UserError(f"{facts['weights']} holds no LoRA weights (lora_A/lora_B)")
    return facts


def _torch_zip_check(path: Path):
    """A PyTorch zip checkpoint whose members all pass their CRC check (the pickle is not read).

    Returns None (keys are unknown until the restricted loader reads it at --apply)."""
    _open_read(path).close()
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        head = _head(path, 2)
        if head[:1] == b"\x80":
            return None  # the legacy (pre-1.6) pickle format: the restricted loader decides at --apply
        raise UserError(f"adapter_model.bin is not a readable PyTorch file ({exc})") from None
    if bad is not None:
        raise UserError(f"adapter_model.bin is corrupt (member {bad} fails its checksum)")
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise UserError("adapter_model.bin is a zip file but not a PyTorch checkpoint")
    return None


# --- data format guessing ----------------------------------------------------------------------


def _decode(raw: bytes) -> tuple[str, str] | None:
    """(text, encoding) of a file head: utf-8, else latin-1 for text without NULs; None for binary."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        if exc.start >= len(raw) - 4:  # a multi-byte character cut by the head's end
            return raw[: exc.start].decode("utf-8"), "utf-8"
        return raw.decode("latin-1"), "latin-1"


def _text_field(records: list[dict]) -> str | None:
    """The field that holds text: 'text' if present, else the string field with the longest values."""
    strings: dict[str, list[int]] = {}
    for r in records:
        for k, v in r.items():
            if isinstance(v, str) and v.strip() and not _numeric(v):
                strings.setdefault(k, []).append(len(v))
    if not strings:
        return None
    if "text" in strings:
        return "text"
    best = max(strings, key=lambda k: (sum(strings[k]) / len(records), k))
    return best if sum(strings[best]) / len(records) >= 8 else None


def _numeric(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return v.strip().lower() in ("true", "false", "none", "null")


def guess_data_format(f: Path) -> dict | None:
    """Guess a catalog format for a data file from its content.

    Returns {'format', 'text_field', 'options', 'said'} (said: what was guessed, for the plan),
    {'config': note} for a CSV of settings, {'problem': why} for data that cannot be used, or
    None for a file that is not data (a JSON document that is not JSON lines).
    """
    suffix = f.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            _open_read(f).close()
            schema = pq.read_schema(f)
        except UserError:
            raise
        except Exception as exc:  # pyarrow missing or the file unreadable
            return {"problem": f"not a readable Parquet file ({type(exc).__name__})"}
        cols = [n for n, t in zip(schema.names, schema.types) if str(t) in ("string", "large_string")]
        if not cols:
            return {"problem": "Parquet file without a text column"}
        col = "text" if "text" in cols else cols[0]
        return {"format": "parquet", "text_field": col, "options": "",
                "said": f"format parquet, text column '{col}' (guessed)"}
    raw = _head(f)
    if not raw.strip():
        return {"problem": "empty file"}
    dec = _decode(raw)
    if dec is None:
        return {"problem": "binary content (NUL bytes) in a text-type file"}
    text, encoding = dec
    options = "" if encoding == "utf-8" else f"encoding={encoding}"
    enc_said = "" if encoding == "utf-8" else f", encoding {encoding} (guessed: not valid UTF-8)"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(raw) == SNIFF_BYTES and lines:
        lines = lines[:-1]  # the last line may be cut
    if suffix in (".jsonl", ".ndjson", ".json"):
        records = []
        for ln in lines[:200]:
            try:
                rec = json.loads(ln)
            except ValueError:
                records = None
                break
            if not isinstance(rec, dict):
                records = None
                break
            records.append(rec)
        if not records:
            if suffix == ".json":
                return None  # a JSON document (settings, results): not data
            return {"problem": "not JSON lines (one JSON object per line)"}
        fld = _text_field(records)
        if fld is None:
            return {"problem": "JSON lines without a text field"}
        return {"format": "jsonl", "text_field": fld, "options": options,
                "said": f"format jsonl, text field '{fld}' (guessed){enc_said}"}
    if suffix in (".csv", ".tsv"):
        try:
            rows = list(csv.DictReader(io.StringIO("\n".join(lines[:201])),
                                       delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error:
            rows = []
        fld = _text_field(rows) if rows else None
        if fld is None or len(rows) < 1:
            return {"config": config_note_csv(lines)}
        return {"format": "csv", "text_field": fld, "options": options,
                "said": f"format csv, text column '{fld}' (guessed){enc_said}"}
    # plain text
    if "<|endoftext|>" in text:
        opt = ";".join(o for o in (options, "sep=<|endoftext|>") if o)
        return {"format": "separator", "text_field": "", "options": opt,
                "said": f"format separator on <|endoftext|> (guessed){enc_said}"}
    if re.search(r"\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", text, re.I):
        return {"format": "gutenberg", "text_field": "", "options": options,
                "said": f"format gutenberg (guessed: Project Gutenberg header){enc_said}"}
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    multi = sum(1 for b in blocks if len(b.strip().splitlines()) > 1)
    if len(blocks) >= 2 and multi >= len(blocks) / 2:
        return {"format": "paragraphs", "text_field": "", "options": options,
                "said": f"format paragraphs (guessed: blank-line separated blocks){enc_said}"}
    return {"format": "lines", "text_field": "", "options": options,
            "said": f"format lines (guessed: one document per line){enc_said}"}


# --- configs and scripts ------------------------------------------------------------------------


def _map_fields(keys: list[str]) -> str:
    mapped = [f"{k} -> {FIELD_MAP[k.lower()]}" for k in keys if k.lower() in FIELD_MAP]
    return ("maps: " + ", ".join(dict.fromkeys(mapped))) if mapped else "no fields map to ours"


def config_note_yaml(f: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(_head(f, 1 << 22).decode("utf-8", errors="replace"))
    except yaml.YAMLError:
        return "YAML config (unparseable, copied as it is)"
    keys: list[str] = []

    def collect(obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                keys.append(str(k))
                collect(v)
        elif isinstance(obj, list):
            for v in obj:
                collect(v)

    collect(data)
    return "YAML config; " + _map_fields(keys)


def config_note_csv(lines: list[str]) -> str:
    header = next(csv.reader(io.StringIO(lines[0] if lines else "")), [])
    first = [ln.split(",")[0].strip() for ln in lines[1:]]
    return "CSV config; " + _map_fields([h.strip() for h in header] + first)


def _module_exists(folder: Path, name: str) -> bool:
    return (folder / f"{name}.py").is_file() or (folder / name).is_dir()


def _installed(name: str) -> bool:
    import importlib.machinery

    if name in sys.builtin_module_names or name in getattr(sys, "stdlib_module_names", ()):
        return True
    cwd = os.getcwd()
    search = [p for p in sys.path if p and os.path.abspath(p) != cwd]
    return importlib.machinery.PathFinder.find_spec(name, search) is not None


def script_report(old_root: Path, rel: str) -> dict:
    """Imports of a script that resolve today and that will not after the move.

    A top-level import resolved from the script's folder or OLD_DIR's root (run from there);
    after the copy to scripts/legacy/ (same relative layout) only the script's folder and the
    installed packages are there. Parsed with `ast`: the script is never run.
    """
    src = old_root / rel
    try:
        tree = ast.parse(_head(src, 1 << 24).decode("utf-8", errors="replace"), filename=rel)
    except SyntaxError as exc:
        return {"unresolved": [], "note": f"could not parse (line {exc.lineno})"}
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    unresolved, missing = [], []
    for name in dict.fromkeys(names):
        here = src.parent
        if _module_exists(here, name):
            continue  # copied beside it, still resolves
        if _module_exists(old_root, name):
            unresolved.append(name)  # resolved from OLD_DIR's root, which is not on the path any more
        elif not _installed(name):
            missing.append(name)
    return {"unresolved": unresolved, "not_installed": missing}


def replacing_command(name: str) -> str | None:
    """The project command that replaces a script, when its file name makes that clear."""
    words = name.lower()
    for keys, command in SCRIPT_COMMANDS:
        if all(k in words for k in keys):
            return command
    return None
