#!/usr/bin/env python3
"""Execute notebooks/*.ipynb headless into outputs/notebooks/ (make notebooks)."""

import argparse
import sys
from pathlib import Path

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.notebooks import run_notebook

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)")
    args = parser.parse_args()
    paths = ProjectPaths.discover()
    notebooks = args.notebooks or sorted((paths.root / "notebooks").glob("*.ipynb"))
    missing = [str(nb) for nb in notebooks if not nb.is_file()]
    if missing:
        parser.exit(2, f"error: notebook not found: {', '.join(missing)}\n")
    try:
        for nb in notebooks:
            out = run_notebook(nb, paths.outputs_dir / "notebooks", paths.root)
            print(f"{nb.name}: ran top to bottom -> {out}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
