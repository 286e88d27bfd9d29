#!/usr/bin/env python3
"""Shim: same code path as `lora-project train` (see `lora-project train --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
