"""Documentation that must stay true: the config reference, the catalog columns, the README."""

from __future__ import annotations

import re

from conftest import REPO, run_cli

from lora_project.config import explain
from lora_project.data.catalog import COLUMNS, OPTION_KEYS


def test_config_reference_in_training_guide_is_current():
    text = (REPO / "docs" / "training_guide.md").read_text()
    block = re.search(r"<!-- config-reference:start.*?-->\n```text\n(.*?)```\n<!-- config-reference:end -->",
                      text, re.S)
    assert block, "config reference block missing"
    assert block.group(1).rstrip("\n") == explain(), \
        "docs/training_guide.md is stale: paste the output of `lora-project config --explain`"


def test_every_catalog_column_and_option_is_documented():
    text = (REPO / "docs" / "training_guide.md").read_text()
    for col in COLUMNS:
        assert f"| `{col}` |" in text, col
    for key in OPTION_KEYS:
        assert f"`{key}`" in text, key


def test_readme_first_screen_gives_exactly_the_two_commands():
    first_screen = "\n".join((REPO / "README.md").read_text().splitlines()[:25])
    commands = re.findall(r"^(make \w+)", first_screen, re.M)
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_help_lists_every_subcommand_and_explains():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("demo", "generate-data", "prepare", "train", "evaluate", "config"):
        assert cmd in proc.stdout
    proc = run_cli("train", "--help")
    assert "--overwrite" in proc.stdout and "--set" in proc.stdout and "MLFLOW_TRACKING_URI" in proc.stdout


def test_every_subcommand_has_its_own_handler():
    """Each subcommand maps to a distinct handler named after it (guards against a shadowed def)."""
    import argparse
    import importlib

    from lora_project import cli

    handlers = list(cli.COMMANDS.values())
    assert len(set(handlers)) == len(handlers)
    modular = set()  # command groups that plug in through COMMAND_MODULES, each with its own handler(s)
    for module in cli.COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"lora_project.cli.{module}").register(sub)
        modular |= set(sub.choices)
    assert not modular & set(cli.COMMANDS)
    assert set(cli.COMMANDS) | modular == set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert cli.COMMANDS["generate-data"].__name__ == "_cmd_generate_data"
    assert cli.COMMANDS["generate"].__name__ == "_cmd_generate_text"


def test_every_script_shim_reaches_its_subcommand():
    import subprocess
    import sys

    scripts = sorted(p for p in (REPO / "scripts").rglob("*.py") if "from lora_project.cli import main" in p.read_text())
    assert len(scripts) >= 10
    for script in scripts:
        command = re.search(r"main\(\[\"([a-z-]+)\"", script.read_text())
        assert command, f"{script} is not a shim over lora_project.cli.main"
        proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (script, proc.stderr[-500:])
        assert f"lora-project {command.group(1)}" in proc.stdout.splitlines()[0], (script, proc.stdout[:200])


def test_api_reference_is_generated_from_the_current_docstrings():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "docs" / "gen_api_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + " (run: make docs)"
    text = (REPO / "docs" / "api_reference.md").read_text()
    for name in ("lora_project.data.childes", "extract_children(", "train_adapter(", "class `MlflowTracker`"):
        assert name in text
