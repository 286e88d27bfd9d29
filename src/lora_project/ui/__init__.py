"""`lora-project ui`: a local web workbench (Gradio) over the same library functions as the CLI.

Tabs: Catalog (status, sample, Prepare), Train (validated form, command line, Start/Stop, live
loss curve read from the experiment folder), Compare (base and adapters side by side), Evaluate
(saved perplexity matrix and minimal pairs, a sampled evaluation), Inspect (adapter list,
heatmaps and spectra, comparison of two adapters). Bound to 127.0.0.1 unless told otherwise;
analytics off, system fonts only: the page loads nothing from outside the machine.
"""

from __future__ import annotations

import os
import sys
import time

from lora_project.errors import RunInterrupted, UserError
from lora_project.paths import ProjectPaths

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def offline_environment(paths: ProjectPaths) -> None:
    """Before Gradio is imported: no telemetry or version checks, and its file cache inside the project."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(paths.outputs_dir / "ui" / "cache"))


def launch(paths: ProjectPaths, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, jobs=None, quiet=False):
    """Build and start the board without blocking; returns (app, url, jobs)."""
    from lora_project.ui.jobs import TrainingJobs

    if not 1 <= int(port) <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    offline_environment(paths)
    from lora_project.ui.app import build_app
    from lora_project.ui.render import CSS
    from lora_project.ui.app import theme

    jobs = jobs or TrainingJobs(paths)
    app = build_app(paths, jobs)
    try:
        _, url, _ = app.launch(server_name=host, server_port=int(port), prevent_thread_lock=True, share=False,
                               quiet=quiet, show_error=True, ssr_mode=False, mcp_server=False, pwa=False,
                               inbrowser=False, footer_links=[], theme=theme(), css=CSS)
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {' '.join(str(exc).split())}") from None
    return app, url, jobs


def serve(paths: ProjectPaths, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log=print) -> str:
    """`lora-project ui`: serve until Ctrl-C; trainings started from the page are stopped (KILLED) on exit."""
    from lora_project.ui.state import is_loopback

    if not is_loopback(host):
        print(f"warning: --host {host} is not a loopback address: anyone who can reach this machine on port "
              f"{port} can read this project's data and start or stop trainings (there is no login)",
              file=sys.stderr)
    app, url, jobs = launch(paths, host, port, quiet=True)
    log(f"lora-project workbench on http://{host}:{port}/ (project {paths.root}); Ctrl-C stops it")
    try:
        while True:
            time.sleep(0.5)
    except (KeyboardInterrupt, RunInterrupted):
        pass
    finally:
        from lora_project.utils import interrupts

        interrupts.clear_stop()
        jobs.stop_all()
        app.close()
    return url
