#!/usr/bin/env python3
"""Shim: same code path as `lora-project extract` (see `lora-project extract --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
