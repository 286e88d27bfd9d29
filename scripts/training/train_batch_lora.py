#!/usr/bin/env python3
"""Shim: same code path as `lora-project train-batch` (see `lora-project train-batch --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-batch", *sys.argv[1:]]))
