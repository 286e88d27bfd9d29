#!/usr/bin/env python3
"""Shim: same code path as `lora-project inspect weights` (see `lora-project inspect weights --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", "weights", *sys.argv[1:]]))
