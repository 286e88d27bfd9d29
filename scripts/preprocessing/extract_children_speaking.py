#!/usr/bin/env python3
"""Shim: same code path as `lora-project extract-children` (see `lora-project extract-children --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract-children", *sys.argv[1:]]))
