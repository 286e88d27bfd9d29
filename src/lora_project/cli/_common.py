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


def add_cluster(p, what: str) -> None:
    """`--cluster ADDRESS`: run on Ray (checked while parsing; Ray itself is imported only when given)."""
    p.add_argument("--cluster", type=_cluster_address, metavar="ADDRESS",
                   help=f"{what} as Ray tasks: 'auto' (RAY_ADDRESS or the cluster `ray start` left), "
                        "'ray://HOST:PORT' (Ray Client), 'HOST:PORT' (a head node) or 'local:N' (a temporary "
                        "local cluster running N tasks at once); settings in the config's cluster section "
                        "(docs/cluster.md)")


def _cluster_address(text: str) -> str:
    from lora_project.cluster.address import parse_address

    if text.strip() != "auto":  # auto is resolved when the command runs (RAY_ADDRESS may change)
        try:
            parse_address(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--cluster {text!r}: ")) from None
    return text


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


def run_options(args, **fields):
    """The training runs' options from the run flags (--no-mlflow, --no-progress) and --json, plus
    `fields` (adapter_name, overwrite, resume, ...)."""
    from lora_project.training.options import RunOptions

    return RunOptions(use_mlflow=not args.no_mlflow, progress=not args.no_progress, log=progress_log(args.json),
                      **fields)


# --- numeric options: every one has a range, checked while parsing (before any work) ----------

#: The largest seed any command takes: what torch.manual_seed and training.seed accept.
MAX_SEED = 2**63 - 1


def _bound(x) -> str:
    return "2^63-1" if x == MAX_SEED else f"{x:g}" if isinstance(x, float) else str(x)


class Range:
    """An argparse `type`: an int or float within [lo, hi] (lo excluded with lo_open), finite.

    A value outside is a usage error naming the option and its range (exit 2, one line), raised
    by the parser, so no command starts any work with it. `tests/test_cli_ranges.py` walks every
    parser and requires this type on every numeric option."""

    def __init__(self, kind: type, lo, hi, *, lo_open: bool = False):
        if kind not in (int, float):
            raise TypeError(kind)
        self.kind, self.lo, self.hi, self.lo_open = kind, lo, hi, lo_open
        self.__name__ = kind.__name__

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.lo_open:
            return f"{what} above {_bound(self.lo)} and at most {_bound(self.hi)}"
        return f"{what} from {_bound(self.lo)} to {_bound(self.hi)}"

    def contains(self, value) -> bool:
        return (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi

    def __call__(self, text: str):
        import math

        shown = text if len(text) <= 40 else text[:37] + "..."
        try:
            value = int(text.strip(), 10) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown!r} is not {self.describe()}") from None
        if not (self.kind is int or math.isfinite(value)) or not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {shown}")
        return value


def add_number(p, flag: str, kind: type, lo, hi, *, help: str, lo_open: bool = False, **kw) -> None:
    """A numeric option with its range, checked by the parser and stated in --help."""
    rng = Range(kind, lo, hi, lo_open=lo_open)
    span = f"> {_bound(lo)}" if lo_open else f"{_bound(lo)}"
    p.add_argument(flag, type=rng, help=f"{help} [{span} to {_bound(hi)}]", **kw)


def add_json(p, help: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_overwrite(p, help: str = "replace existing outputs") -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_seed(p, help: str = "seed", default: int = 0) -> None:
    add_number(p, "--seed", int, 0, MAX_SEED, default=default, help=f"{help} (default: {default})")


def add_seeds(p, help: str) -> None:
    """`--seeds N|S1,S2,...` (train, train-batch), checked while parsing."""
    p.add_argument("--seeds", type=_seeds, metavar="N|S1,S2,...", help=help)


def _seeds(text: str) -> str:
    from lora_project.training.seeds import parse_seeds

    try:
        parse_seeds(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seeds ")) from None
    return text


def add_sampling_args(p, *, max_new_tokens: int, temperature: float, top_p: float, greedy_ok: bool,
                      seed_help: str) -> None:
    """--max-new-tokens, --temperature, --top-p and --seed of the commands that sample text."""
    add_number(p, "--max-new-tokens", int, 1, 4096, default=max_new_tokens,
               help=f"longest continuation in tokens (default: {max_new_tokens})")
    add_number(p, "--temperature", float, 0.0, 100.0, lo_open=not greedy_ok, default=temperature,
               help=f"sampling temperature{'; 0 = greedy' if greedy_ok else ''} (default: {temperature:g})")
    add_number(p, "--top-p", float, 0.0, 1.0, lo_open=True, default=top_p,
               help=f"nucleus sampling mass (default: {top_p:g}{', off' if top_p == 1 else ''})")
    add_seed(p, seed_help)
