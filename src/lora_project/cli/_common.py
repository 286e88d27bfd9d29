"""What the command modules share: the parser class, config flags, config loading, JSON output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_project.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one `error:` line and exit code 2, like every other bad input."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", metavar="YAML",
                   help="training config file (default: config/training_config.yaml); repeatable, later wins")
    p.add_argument("--model-config", type=Path, metavar="YAML",
                   help="model/LoRA config file (default: config/model_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set training.lr=2e-4 --set lora.r=16 (repeatable)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that train."""
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_files(args, paths) -> list[Path]:
    """The config files named by --model-config/--config, or the project's defaults."""
    return [args.model_config or paths.model_config] + (args.config or [paths.training_config])


def load_cfg(args, paths):
    from lora_project.config import load_config

    return load_config(config_files(args, paths), args.overrides)


def select_datasets(args, catalog) -> list[str]:
    """NAMES or --all (every enabled row), every name checked before any work starts."""
    from lora_project.data.catalog import get_entry

    if args.all and args.names:
        raise UserError("give dataset names or --all, not both")
    names = [n for n, e in catalog.items() if e.enabled] if args.all else list(dict.fromkeys(args.names))
    if not names:
        raise UserError("name at least one dataset, or pass --all")
    for n in names:
        get_entry(catalog, n)
    return names


def print_json(obj) -> None:
    """One strict JSON object on stdout (NaN and infinities as null)."""
    from lora_project.utils.io_utils import json_text

    print(json_text(obj))


def progress_log(as_json: bool):
    """Where progress lines go: stderr when stdout carries one JSON object, else stdout."""
    return (lambda m: print(m, file=sys.stderr)) if as_json else print
