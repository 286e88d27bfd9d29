#!/usr/bin/env python3
"""Shim: same code path as `lora-project generate-data` (see `lora-project generate-data --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-data", *sys.argv[1:]]))
