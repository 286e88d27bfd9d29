"""Read-only scan of an old project folder: every file is classified into exactly one item.

Nothing here writes, follows a symbolic link, imports or runs user code, or unpickles: folders
are listed with ``os.scandir`` (symlinks are reported and never entered), Python files are
parsed with ``ast``, weights are checked by their safetensors header or, for PyTorch ``.bin``
files, by the zip container's checksums (the pickle inside is not read here). Files are read
in chunks, so big files cost time, not memory.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lora_project.adopt._project import UserError

# Folders that are caches or version control: left in place as one item, never entered.
from lora_project.adopt.classify import (  # noqa: F401 - re-used names of the scan
    _TEMP_RE,
    ADAPTER_EXTRAS,
    ADAPTER_FILES,
    CACHE_DIRS,
    DATA_SUFFIXES,
    FIELD_MAP,
    LOG_DIRS,
    NOT_DATA_TXT,
    PICKLE_SUFFIXES,
    SCRIPT_COMMANDS,
    SNIFF_BYTES,
    TRAINER_PICKLES,
    _decode,
    _head,
    _installed,
    _map_fields,
    _module_exists,
    _numeric,
    _open_read,
    _text_field,
    _torch_zip_check,
    config_note_csv,
    config_note_yaml,
    file_sha256,
    guess_data_format,
    inspect_adapter,
    replacing_command,
    script_report,
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


def content_digest(root: Path, rels: list[str]) -> tuple[str, dict[str, str]]:
    """One sha256 over several files (names relative to their common folder, and contents),
    and each file's own sha256."""
    import hashlib

    h, shas = hashlib.sha256(), {}
    base = os.path.commonpath(rels) if len(rels) > 1 else os.path.dirname(rels[0]) if rels else ""
    for rel in sorted(rels):
        name = os.path.relpath(rel, base) if base else rel
        shas[rel] = file_sha256(root / rel)
        h.update(os.fsencode(name) + b"\0" + shas[rel].encode() + b"\0")  # a name need not be UTF-8
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
        for link in [f for f in files if f.is_symlink()]:  # not followed, so not imported: each one reported
            target = os.readlink(link)
            out = not _inside(self.root, link.parent / target)
            self.add(self.rel(link), "link", "leave", f"symbolic link to {target} in the MLflow store (not followed, "
                     "not imported)" + ("; it points out of the old folder" if out else ""), [link],
                     attention=f"{self.rel(link)}: symbolic link out of the old folder ({target}); not followed, "
                     "its target is not imported" if out else "")
        files = [f for f in files if not f.is_symlink()]
        runs = sorted({p.parent.name for p in files if p.name == "meta.yaml" and p.parent.parent.parent == d})
        self.add(self.rel(d) + "/", "mlflow", "import",
                 f"MLflow file store ({len(runs)} run{'s' if len(runs) != 1 else ''}); imported into the project's "
                 "tracking store with params, metric histories, tags and artifacts", files,
                 info={"runs": len(runs), "run_folders": len(runs)})


def _inside(root: Path, target: Path) -> bool:
    """Whether `target` (resolved, symlinks followed) lies inside `root`."""
    try:
        return Path(os.path.realpath(target)).is_relative_to(root)
    except OSError:
        return False


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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
