#!/usr/bin/env python3
"""Execute notebooks/*.ipynb headless into outputs/notebooks/ (make notebooks)."""

import sys
from pathlib import Path

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.notebooks import run_notebook

if __name__ == "__main__":
    paths = ProjectPaths.discover()
    notebooks = sorted((paths.root / "notebooks").glob("*.ipynb")) if len(sys.argv) < 2 else [Path(a) for a in sys.argv[1:]]
    try:
        for nb in notebooks:
            out = run_notebook(nb, paths.outputs_dir / "notebooks", paths.root)
            print(f"{nb.name}: ran top to bottom -> {out}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
