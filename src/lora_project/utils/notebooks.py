"""Execute the project's notebooks headless (nbclient + the Python 3 kernel of this environment).

Executed copies go to ``outputs/notebooks/``; the notebooks in ``notebooks/`` stay
without outputs in git.
"""

from __future__ import annotations

from pathlib import Path

from lora_project.errors import UserError


def run_notebook(path: Path, out_dir: Path, cwd: Path, timeout: int = 900) -> Path:
    """Run every cell top to bottom; raise UserError naming the failing cell's error."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(str(path), as_version=4)
    km = KernelManager(kernel_name="python3", transport="ipc")  # local sockets, not TCP ports
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        raise UserError(f"{path.name}: a cell failed: {str(exc).strip().splitlines()[-1][:300]}") from None
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    nbformat.write(nb, str(out))
    return out


def outputs_of(nb_path: Path) -> list[dict]:
    """All outputs of an executed notebook (for tests: errors, images, text)."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
