"""`lora-project`: one command, several subcommands. Entry points only orchestrate.

Exit codes: 0 success; 2 bad input (one line ``error: ...`` on stderr, no traceback);
1 a bug (traceback shown); 130 interrupted by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from lora_project import __version__
from lora_project.cli._common import Parser
from lora_project.errors import RunInterrupted, UserError
from lora_project.utils import interrupts

EXAMPLES = """\
examples:
  lora-project demo                                  # the main job (make demo)
  lora-project generate-data --kind toddler          # data/raw/toddler_data.txt
  lora-project prepare toddler_data                  # data/processed/toddler_data/
  lora-project train toddler_data --set training.max_steps=100
  lora-project evaluate --dataset toddler_data --split test --adapter adapters/toddler_data_lora --json
  lora-project train-batch --all                     # one adapter per catalog dataset
  lora-project sweep toddler_data --param lora.r=4,8 --param training.lr=1e-4:3e-3:log --trials 8
  lora-project inspect weights adapters/toddler_data_lora
  lora-project config --explain                      # every config field, default and range
  lora-project ui                                    # the web workbench on http://127.0.0.1:7860/
"""


# One module per command group under lora_project.cli, in the order `lora-project --help` lists them.
# Each exposes register(sub): it adds its parser(s) and sets `handler=fn(args, paths)` as a default.
# Modules here must stay light at import time (no torch, no transformers).
COMMAND_MODULES: tuple[str, ...] = ("demo", "data", "train", "evaluate", "benchmark", "inspect", "config",
                                    "adopt", "catalog", "profile", "sweep", "ui")


def build_parser() -> argparse.ArgumentParser:
    """The `lora-project` argument parser: one subcommand per job, each with examples in its --help."""
    parser = Parser(
        prog="lora-project", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A LoRA workbench for small causal language models: generate and prepare text "
                    "datasets, train one LoRA adapter per dataset, track runs in MLflow, evaluate "
                    "adapters against the base model.", epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"lora-project {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"lora_project.cli.{name}").register(sub)
    return parser


# Failures of the machine, not of the program: a clear line and exit 2 like other bad input.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 ok, 2 bad input, 130 interrupted, 1 a bug)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from lora_project.paths import ProjectPaths
    from lora_project.utils.logging_utils import quiet_libraries

    quiet_libraries()
    interrupts.install()
    try:
        from lora_project.models.kernels import requested_kernel

        requested_kernel()  # a bad LORA_PROJECT_FP32_KERNEL fails here, before any work
        args.handler(args, ProjectPaths.discover())
        return 0
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunInterrupted):
        hint = getattr(sys.exc_info()[1], "hint", None)
        print(f"error: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise  # anything else is a bug: exit 1 with the traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where} (earlier outputs were left as they were)", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # leave a torchrun process group cleanly
            from lora_project.training.distributed import dist_info, shutdown

            shutdown(dist_info())


if __name__ == "__main__":
    raise SystemExit(main())
