#!/usr/bin/env python3
"""Shim: same code path as `lora-project benchmark` (see `lora-project benchmark --help`)."""

import sys

from lora_project.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
