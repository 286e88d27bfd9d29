"""`python -m lora_project` is the same as the `lora-project` command."""

from lora_project.cli import main

raise SystemExit(main())
