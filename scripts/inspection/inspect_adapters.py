#!/usr/bin/env python3
"""Shim: same code path as `lora-project inspect adapters` (see `lora-project inspect adapters --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", "adapters", *sys.argv[1:]]))
