#!/usr/bin/env python3
"""Shim: same code path as `lora-project inspect values` (see `lora-project inspect values --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", "values", *sys.argv[1:]]))
