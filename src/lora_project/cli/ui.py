"""`lora-project ui`: the local web workbench."""

from __future__ import annotations

import argparse

from lora_project.cli._common import add_number

EPILOG = """\
examples:
  lora-project ui                      # http://127.0.0.1:7860/ (this machine only)
  lora-project ui --port 8080
  lora-project ui --host 0.0.0.0       # reachable from the network: prints a warning (no login)
"""


UI_DESCRIPTION = """\
Serve a local web page (Gradio) over the same functions as these commands: the catalog with Prepare; a
training form validated like `train`, with the equivalent command line, Start/Stop and a live loss
curve; base and adapters side by side; saved evaluations; adapter inspection. Bound to 127.0.0.1 unless
--host says otherwise. Ctrl-C stops it (and the trainings it started, which end KILLED)."""


def register(sub) -> None:
    p = sub.add_parser("ui", help="open the web workbench: catalog, training with a live loss curve, compare, "
                                  "evaluate, inspect",
                       description=UI_DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_number(p, "--port", int, 1, 65535, default=7860, help="TCP port (default 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else is reachable from other machines)")
    p.set_defaults(handler=run)


def run(args, paths) -> None:
    from lora_project.ui import serve

    serve(paths, args.host, args.port)
