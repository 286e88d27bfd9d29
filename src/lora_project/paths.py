"""Every project path is resolved here, from one root.

The project root is, in order: the ``LORA_PROJECT_ROOT`` environment variable, else the
nearest folder at or above the current directory that holds ``config/`` and
``pyproject.toml`` or ``config/training_config.yaml``, else the current directory. Tests
point ``LORA_PROJECT_ROOT`` at a temporary folder; users run commands from the checkout.

The converted-model cache lives outside the project (it is shared by all clones):
``LORA_PROJECT_CACHE`` or ``$XDG_CACHE_HOME/lora-project`` or ``~/.cache/lora-project``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lora_project.errors import UserError

# Dataset and adapter names become folder names; keep them to a safe alphabet so that
# a name can never escape its folder ("../x", "/abs", "a/b" are all rejected).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "name") -> str:
    """Validate a dataset or adapter name; raise UserError naming the problem."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UserError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' "
            "(start with a letter or digit, no '..', no '/')"
        )
    return name


def _find_root(start: Path) -> Path:
    for folder in [start, *start.parents]:
        if (folder / "config" / "training_config.yaml").is_file() or (
            (folder / "config").is_dir() and (folder / "pyproject.toml").is_file()
        ):
            return folder
    return start


@dataclass(frozen=True)
class ProjectPaths:
    """The project's folders (see DESIGN.md, 'Layout')."""

    root: Path

    @classmethod
    def discover(cls) -> "ProjectPaths":
        env = os.environ.get("LORA_PROJECT_ROOT")
        root = Path(env).expanduser() if env else _find_root(Path.cwd())
        return cls(root.resolve())

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def training_config(self) -> Path:
        return self.config_dir / "training_config.yaml"

    @property
    def model_config(self) -> Path:
        return self.config_dir / "model_config.yaml"

    @property
    def catalog(self) -> Path:
        return self.config_dir / "dataset_catalog.csv"

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "data" / "datasets"

    @property
    def processed_dir(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def experiments_dir(self) -> Path:
        return self.root / "experiments"

    @property
    def mlruns_dir(self) -> Path:
        return self.root / "mlruns"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.outputs_dir / "checkpoints"

    @property
    def metrics_dir(self) -> Path:
        return self.outputs_dir / "metrics"

    @property
    def sweeps_dir(self) -> Path:
        return self.outputs_dir / "sweeps"

    def processed(self, name: str) -> Path:
        return self.processed_dir / check_name(name, "dataset name")

    def adapter(self, name: str) -> Path:
        return self.adapters_dir / f"{check_name(name, 'adapter name')}_lora"

    def inside(self, path: Path, what: str) -> Path:
        """Resolve a path from a config or catalog and refuse one outside the project."""
        p = (self.root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
        if p != self.root and self.root not in p.parents:
            raise UserError(f"{what} {str(path)!r} points outside the project folder {self.root}")
        if p.is_dir():
            self._no_links_out(p, what)
        return p

    def _no_links_out(self, folder: Path, what: str) -> None:
        """Refuse a folder holding a symlink (to a file or folder) that resolves outside the project:
        its contents would be read into the project's data as if they were the user's."""
        for top, dirs, files in os.walk(folder, followlinks=False):
            for name in dirs + files:
                q = Path(top) / name
                if q.is_symlink():
                    target = q.resolve()
                    if target != self.root and self.root not in target.parents:
                        raise UserError(f"{what}: {q.relative_to(self.root)} is a symlink to {target}, outside "
                                        "the project; copy the file in instead")


def cache_dir() -> Path:
    """Folder for converted models and other machine-wide caches."""
    env = os.environ.get("LORA_PROJECT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lora-project"
