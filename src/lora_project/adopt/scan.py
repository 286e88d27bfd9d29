"""Read-only scan of an old project folder: every file is classified into exactly one item.

Nothing here writes, follows a symbolic link, imports or runs user code, or unpickles: folders
are listed with ``os.scandir`` (symlinks are reported and never entered), Python files are
parsed with ``ast``, weights are checked by their safetensors header or, for PyTorch ``.bin``
files, by the zip container's checksums (the pickle inside is not read here). Files are read
in chunks, so big files cost time, not memory.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
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


@dataclass
class Item:
    """One entry of the plan: a file or a folder of the old project and what happens to it."""

    source: str                       # relative to OLD_DIR; folders end with '/'
    kind: str                         # adapter, data, chat, mlflow, script, notebook, config, trainer-state,
    #                                   cache, temp, log, link, other
    action: str                       # copy, convert, import, leave, skip
    reason: str = ""
    destination: str | None = None    # relative to the project root (set by the plan)
    files: list[str] = field(default_factory=list)   # every old file this item covers
    size: int = 0                     # bytes of the covered files
    info: dict = field(default_factory=dict)          # kind-specific facts (guessed row, adapter facts, ...)
    digest: str = ""                  # sha256 of the adopted content (adoptions are matched by it)
    attention: str = ""               # a line for the "needs your attention" list

    def public(self) -> dict:
        """The five fields of the --json item."""
        return {"source": self.source, "kind": self.kind, "action": self.action,
                "destination": self.destination, "reason": self.reason}


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


def content_digest(root: Path, rels: list[str]) -> tuple[str, dict[str, str]]:
    """One sha256 over several files (names relative to their common folder, and contents),
    and each file's own sha256."""
    import hashlib

    h, shas = hashlib.sha256(), {}
    base = os.path.commonpath(rels) if len(rels) > 1 else os.path.dirname(rels[0]) if rels else ""
    for rel in sorted(rels):
        name = os.path.relpath(rel, base) if base else rel
        shas[rel] = file_sha256(root / rel)
        h.update(name.encode() + b"\0" + shas[rel].encode() + b"\0")
    return h.hexdigest(), shas


def check_old_dir(old_dir: Path, project_root: Path) -> Path:
    """OLD_DIR resolved, or a UserError: missing, not a folder, a symlink loop, the project itself,
    inside the project, or holding the project."""
    old_dir = Path(old_dir).expanduser()
    try:
        resolved = old_dir.resolve(strict=True)
    except FileNotFoundError:
        if old_dir.is_symlink():
            raise UserError(f"{old_dir} is a symbolic link to nothing") from None
        raise UserError(f"folder not found: {old_dir}") from None
    except (RuntimeError, OSError) as exc:  # ELOOP: a symlink loop
        raise UserError(f"{old_dir} cannot be resolved ({getattr(exc, 'strerror', None) or exc}): "
                        "a symbolic link loop?") from None
    if not resolved.is_dir():
        raise UserError(f"{old_dir} is not a folder; adopt takes the old project's folder "
                        "(for one data file use `lora-project catalog add NAME FILE`)")
    root = Path(project_root).resolve()
    if resolved == root:
        raise UserError(f"{old_dir} is this project itself; give the old project's folder")
    if root in resolved.parents:
        raise UserError(f"{old_dir} is inside this project ({root}); adopt takes a folder outside it")
    if resolved in root.parents:
        raise UserError(f"{old_dir} contains this project ({root}); give the old project's own folder")
    if not os.access(resolved, os.R_OK | os.X_OK):
        raise UserError(f"cannot read folder {old_dir}: permission denied")
    return resolved


def _walk_files(folder: Path) -> list[Path]:
    """Every file and symlink under `folder` (symlinks not followed), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=_raise_walk):
        d = Path(dirpath)
        dirnames.sort()
        out.extend(d / n for n in sorted(filenames))
        out.extend(d / n for n in dirnames if (d / n).is_symlink())
    return out


def _raise_walk(exc: OSError) -> None:
    raise UserError(f"cannot read folder {exc.filename}: {exc.strerror or exc}")


def _has_adapter(folder: Path) -> bool:
    return any("adapter_config.json" in files for _, _, files in os.walk(folder, followlinks=False))


def _is_mlflow_store(folder: Path) -> bool:
    """An MLflow file store: numbered experiment folders with meta.yaml (or a .trash folder)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    for e in entries:
        if e.is_dir(follow_symlinks=False) and e.name.isdigit() and \
                os.path.isfile(os.path.join(e.path, "meta.yaml")):
            return True
    return False


class Scanner:
    """Walk OLD_DIR once and build the items (see the module docstring)."""

    def __init__(self, old_dir: Path):
        self.root = old_dir
        self.items: list[Item] = []

    def rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()

    def size(self, p: Path) -> int:
        try:
            return p.lstat().st_size
        except OSError:
            return 0

    def add(self, source: str, kind: str, action: str, reason: str, files: list[Path], **kw) -> Item:
        item = Item(source=source, kind=kind, action=action, reason=reason,
                    files=[self.rel(f) for f in files], size=sum(self.size(f) for f in files), **kw)
        self.items.append(item)
        return item

    def folder(self, d: Path, kind: str, reason: str) -> None:
        files = _walk_files(d)
        if files:
            self.add(self.rel(d) + "/", kind, "leave", reason, files)

    def run(self) -> list[Item]:
        self.walk(self.root, in_temp=False)
        return self.items

    def walk(self, d: Path, in_temp: bool) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except PermissionError:
            raise UserError(f"cannot read folder {d}: permission denied") from None
        except OSError as exc:
            raise UserError(f"cannot read folder {d}: {exc.strerror or exc}") from None
        files, dirs = [], []
        for e in entries:
            p = Path(e.path)
            if e.is_symlink():
                self.add(self.rel(p), "link", "leave", f"symbolic link to {os.readlink(p)} (not followed)", [p])
            elif e.is_dir(follow_symlinks=False):
                dirs.append(p)
            elif e.is_file(follow_symlinks=False):
                files.append(p)
            else:
                self.add(self.rel(p), "other", "leave", "not a regular file", [p])
        names = {f.name for f in files}
        if "adapter_config.json" in names:
            files = self.adapter(d, files)
        chats = [f for f in files if f.suffix.lower() == ".cha"]
        if chats:
            if in_temp:
                for f in chats:
                    self.add(self.rel(f), "temp", "leave", "in a temporary folder", [f])
            else:
                self.chat_folder(d, chats)
            files = [f for f in files if f not in chats]
        for f in files:
            if in_temp:
                self.add(self.rel(f), "temp", "leave", "in a temporary folder", [f])
            else:
                self.file(f)
        for sub in dirs:
            name = sub.name
            if name in CACHE_DIRS:
                self.folder(sub, "cache", "cache or tool folder, left in place")
            elif _is_mlflow_store(sub):
                self.mlflow(sub)
            elif name.lower() in LOG_DIRS and not _has_adapter(sub):
                self.folder(sub, "log", "logs, left in place")
            elif name.startswith("."):
                self.folder(sub, "other", "hidden folder, left in place")
            elif in_temp or _TEMP_RE.match(name) or name.lower() in LOG_DIRS:
                if _has_adapter(sub):
                    self.walk(sub, in_temp=True)  # adapters saved in temp folders are still adopted
                else:
                    self.folder(sub, "temp", "temporary folder, left in place")
            else:
                self.walk(sub, in_temp=False)

    # --- adapters ---------------------------------------------------------------------------

    def adapter(self, d: Path, files: list[Path]) -> list[Path]:
        """Classify an adapter folder; returns the files of the folder it did not cover."""
        by_name = {f.name: f for f in files}
        part = [by_name[n] for n in ADAPTER_FILES + ADAPTER_EXTRAS if n in by_name]
        rest = [f for f in files if f not in part]
        src = self.rel(d) + "/" if d != self.root else "./"
        checkpoint = re.match(r"^checkpoint-\d+$", d.name) is not None
        info = {"checkpoint": checkpoint, "trainer_state": "trainer_state.json" in by_name}
        try:
            facts = inspect_adapter(d, by_name)
        except UserError as exc:
            self.add(src, "adapter", "leave", f"broken adapter, not adopted: {exc}", part,
                     attention=f"{src}: broken adapter ({exc})")
        else:
            info.update(facts)
            action = "convert" if facts["weights"] == "adapter_model.bin" else "copy"
            used = [by_name[n] for n in ("adapter_config.json", facts["weights"]) + ADAPTER_EXTRAS if n in by_name]
            unused = [f for f in part if f not in used]
            reason = "PEFT adapter" + (" from a Trainer checkpoint" if checkpoint else "")
            if action == "convert":
                reason += "; .bin weights converted to safetensors with torch.load(weights_only=True)"
            if info["trainer_state"]:
                reason += "; loss history from trainer_state.json kept"
            self.add(src, "adapter", action, reason, used, info=info)
            for f in unused:
                self.add(self.rel(f), "other", "leave",
                         "second copy of the weights (the safetensors file is adopted)", [f])
        for f in list(rest):
            if TRAINER_PICKLES.match(f.name):
                self.add(self.rel(f), "trainer-state", "leave",
                         "pickled Trainer state (optimizer/scheduler/RNG/arguments): never read, left in place", [f])
            else:
                self.add(self.rel(f), "other", "leave", "beside an adapter, not part of it; left in place", [f])
        return []

    # --- data -------------------------------------------------------------------------------

    def chat_folder(self, d: Path, chats: list[Path]) -> None:
        text = b"".join(_head(f, 64 * 1024) for f in chats[:20])
        speakers = re.findall(rb"^\*([A-Z0-9]{2,4}):", text, re.M)
        participants = "CHI" if b"CHI" in speakers or not speakers else \
            max(set(speakers), key=speakers.count).decode()
        src = self.rel(d) + "/" if d != self.root else "./"
        name_from = d.name if d != self.root else (chats[0].stem if len(chats) == 1 else "childes")
        self.add((src if src != "./" else "") + "*.cha", "chat", "copy",
                 f"CHAT transcripts ({len(chats)} file{'s' if len(chats) != 1 else ''}); catalog row kind "
                 f"childes, participants={participants} (guessed)", chats,
                 info={"row": {"kind": "childes", "format": "lines", "options": f"participants={participants}"},
                       "name": name_from, "folder": True})

    def file(self, f: Path) -> None:
        name, suffix = f.name, f.suffix.lower()
        rel = self.rel(f)
        if suffix == ".py":
            self.add(rel, "script", "copy", "", [f])
        elif suffix == ".ipynb":
            self.add(rel, "notebook", "copy", "notebook", [f])
        elif suffix in (".yaml", ".yml"):
            self.add(rel, "config", "copy", config_note_yaml(f), [f])
        elif suffix == ".log":
            self.add(rel, "log", "leave", "log file, left in place", [f])
        elif suffix == ".zip":
            self.zip_file(f)
        elif suffix in DATA_SUFFIXES and not NOT_DATA_TXT.match(name):
            self.data_file(f)
        elif TRAINER_PICKLES.match(name) or suffix in PICKLE_SUFFIXES:
            self.add(rel, "other", "leave", f"pickle/binary file ({_fmt_size(self.size(f))}): never read, "
                     "left in place", [f])
        elif suffix == ".safetensors":
            self.add(rel, "other", "leave", f"weights without adapter_config.json ({_fmt_size(self.size(f))}), "
                     "left in place", [f])
        else:
            self.add(rel, "other", "leave", f"left in place ({_fmt_size(self.size(f))})", [f])

    def zip_file(self, f: Path) -> None:
        rel = self.rel(f)
        _open_read(f).close()
        try:
            with zipfile.ZipFile(f) as z:
                n = sum(1 for i in z.infolist() if i.filename.lower().endswith(".cha"))
        except (zipfile.BadZipFile, OSError) as exc:
            self.add(rel, "other", "leave", f"unreadable zip archive ({exc}), left in place", [f])
            return
        if n:
            self.add(rel, "chat", "copy", f"CHILDES archive ({n} CHAT files); catalog row kind childes, "
                     "participants=CHI (guessed)", [f],
                     info={"row": {"kind": "childes", "format": "lines", "options": "participants=CHI"},
                           "name": f.stem, "folder": False})
        else:
            self.add(rel, "other", "leave", f"zip archive without CHAT files ({_fmt_size(self.size(f))}), "
                     "left in place", [f])

    def data_file(self, f: Path) -> None:
        rel = self.rel(f)
        guess = guess_data_format(f)
        if guess is None:
            self.add(rel, "other", "leave", f"left in place ({_fmt_size(self.size(f))})", [f])
            return
        if "config" in guess:
            self.add(rel, "config", "copy", guess["config"], [f])
            return
        if "problem" in guess:
            self.add(rel, "data", "leave", f"not adopted: {guess['problem']}", [f],
                     attention=f"{rel}: {guess['problem']}")
            return
        row = {k: v for k, v in guess.items() if k in ("format", "text_field", "options")}
        row["kind"] = "local"
        self.add(rel, "data", "copy", "catalog row kind local, " + guess["said"], [f],
                 info={"row": row, "name": f.stem, "folder": False})

    def mlflow(self, d: Path) -> None:
        files = _walk_files(d)
        runs = sorted({p.parent.name for p in files if p.name == "meta.yaml" and p.parent.parent.parent == d})
        self.add(self.rel(d) + "/", "mlflow", "import",
                 f"MLflow file store ({len(runs)} run{'s' if len(runs) != 1 else ''}); imported into the project's "
                 "tracking store with params, metric histories, tags and artifacts", files,
                 info={"runs": len(runs)})


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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


def scan(old_dir: Path) -> list[Item]:
    """Classify every file under `old_dir` (already checked with `check_old_dir`)."""
    items = Scanner(old_dir).run()
    for it in items:
        if it.kind == "script":
            rep = script_report(old_dir, it.source)
            cmd = replacing_command(Path(it.source).name)
            parts = ["script copied unchanged"]
            if cmd:
                parts.append(f"replaced by `{cmd}`")
            if rep.get("note"):
                parts.append(rep["note"])
            if rep.get("unresolved"):
                parts.append("imports that no longer resolve after the move: " + ", ".join(rep["unresolved"]))
                it.attention = f"{it.source}: imports {', '.join(rep['unresolved'])} no longer resolve"
            if rep.get("not_installed"):
                parts.append("not installed here: " + ", ".join(rep["not_installed"]))
            it.reason = "; ".join(parts)
            it.info.update(rep, command=cmd)
    return items
