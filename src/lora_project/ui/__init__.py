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

    check_address(host, int(port))
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
    except OSError as exc:  # Gradio's own advice names its environment variable and launch(): ours names --port
        check_address(host, int(port))
        raise UserError(f"cannot serve on {host}:{port} ({' '.join(str(exc).split()).split('. ')[0]}); "
                        "try another --port") from None
    return app, url, jobs


def check_address(host: str, port: int) -> None:
    """Refuse, with the option to blame, a --host this machine cannot bind or a --port in use."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"--port: must be an integer from 1 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host}: not an address or host name this machine can resolve "
                        f"({getattr(exc, 'strerror', None) or exc}); e.g. --host 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            probe.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port} is in use on {host}; pick a free one, e.g. --port {port + 1 if port < 65535 else 7860}") from None
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise UserError(f"--host {host}: not an address of this machine ({exc.strerror}); "
                                "e.g. --host 127.0.0.1") from None
            if exc.errno == errno.EACCES:
                raise UserError(f"--port {port}: not allowed for this user ({exc.strerror}); "
                                "ports below 1024 need privileges, e.g. --port 7860") from None
            raise


def serve(paths: ProjectPaths, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log=print) -> str:
    """`lora-project ui`: serve until Ctrl-C; trainings started from the page are stopped (KILLED) on exit."""
    from lora_project.ui.state import is_loopback

    check_address(host, int(port))  # a bad --host or a busy --port: one line, before the warning below
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
