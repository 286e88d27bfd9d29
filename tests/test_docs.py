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


def test_every_subcommand_has_its_own_handler_in_its_own_module():
    """Each (sub)command sets a distinct handler defined in the cli module that registers its parser,
    never in lora_project.cli itself; `--help` lists the commands in a fixed order."""
    import argparse
    import importlib

    from lora_project import cli

    def leaves(name, parser):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not nested:
            return [(name, parser)]
        return [leaf for sub_name, p in nested[0].choices.items() for leaf in leaves(f"{name} {sub_name}", p)]

    assert not hasattr(cli, "COMMANDS")
    handlers, registered = {}, []
    for module in cli.COMMAND_MODULES:
        mod = importlib.import_module(f"lora_project.cli.{module}")
        sub = argparse.ArgumentParser().add_subparsers()
        mod.register(sub)
        registered += list(sub.choices)
        for command, parser in sub.choices.items():
            for leaf, p in leaves(command, parser):
                handler = p._defaults.get("handler")
                assert callable(handler), f"{leaf}: no handler"
                assert handler.__module__ == mod.__name__, (leaf, handler.__module__)
                handlers[leaf] = handler
    assert len(set(handlers.values())) == len(handlers), "two subcommands share a handler"
    top = list(cli.build_parser()._subparsers._group_actions[0].choices)
    assert top == registered == ["demo", "generate-data", "prepare", "extract", "extract-children", "train",
                                 "train-batch", "evaluate", "generate", "benchmark", "inspect", "merge", "config",
                                 *top[13:]]
    assert {"adopt", "catalog"} <= set(top[13:])
    assert handlers["generate-data"].__name__ == "run_generate_data"
    assert handlers["generate"].__name__ == "run_generate"
    assert {"inspect adapters", "inspect weights", "inspect values", "inspect compare",
            "catalog add", "catalog list", "catalog remove"} <= set(handlers)


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


def test_the_helper_scripts_explain_themselves_and_write_nothing_for_help():
    import subprocess
    import sys

    ref = REPO / "docs" / "api_reference.md"
    before = ref.stat().st_mtime_ns
    for script in ("scripts/docs/gen_api_reference.py", "scripts/notebooks/run_notebooks.py"):
        proc = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr
    assert ref.stat().st_mtime_ns == before  # --help did not rewrite the reference
    proc = subprocess.run([sys.executable, str(REPO / "scripts/notebooks/run_notebooks.py"), "nope.ipynb"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: notebook not found: nope.ipynb", proc.stderr

