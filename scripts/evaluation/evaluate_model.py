#!/usr/bin/env python3
"""Shim: same code path as `lora-project evaluate` (see `lora-project evaluate --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
