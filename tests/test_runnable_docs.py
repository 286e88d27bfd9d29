"""Documentation that runs: every fenced block marked ```bash runnable in the README and in
docs/*.md is executed, command by command, in one fresh project (tiny model), in the order
the files are read (README first). A command that fails names its file and line."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, run_cli

FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)


def runnable_commands() -> list[tuple[str, int, str]]:
    """(file, line, command) of every marked command; backslash continuations joined."""
    out = []
    for f in FILES:
        text = f.read_text()
        for m in _BLOCK.finditer(text):
            start = text[: m.start(1)].count("\n") + 1
            pending, first = "", None
            for i, line in enumerate(m.group(1).splitlines()):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if first is None:
                    first = start + i
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                out.append((f.name, first, pending + line))
                pending, first = "", None
    return out


def test_enough_commands_are_marked_runnable():
    cmds = runnable_commands()
    assert len(cmds) >= 20, len(cmds)
    assert {f for f, _, _ in cmds} >= {"README.md", "training_guide.md"}


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present (some examples read it)")
def test_runnable_commands_in_docs_run(project, tracking_store):
    (project.parent / "shared").symlink_to(SHARED_DATA.parent)  # the docs' ../shared/data/...
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for fname, line, cmd in runnable_commands():
        argv = _plain_cli_argv(cmd)
        if argv is not None:  # the CLI in this process: the same code, without ~4 s of interpreter start each
            proc = run_cli(*argv, cwd=project)
        else:
            proc = subprocess.run(["bash", "-c", cmd], cwd=project, env=env, capture_output=True, text=True,
                                  timeout=600)
        assert proc.returncode == 0, f"{fname}:{line}: {cmd}\n{proc.stderr[-2000:]}"


def _plain_cli_argv(cmd: str) -> list[str] | None:
    """The arguments of a plain `lora-project ...` command (a trailing # comment allowed); None when
    the line needs the shell (pipes, redirections, substitutions, several commands, variables).
    The installed entry point itself is run by tests/test_entry_points.py."""
    words = shlex.split(cmd, comments=True)
    if not words or words[0] != "lora-project" or _needs_shell(cmd):
        return None
    return words[1:]


def _needs_shell(cmd: str) -> bool:
    """Whether the shell would do more than split `cmd` into words: an operator (| & ; < > ( )), a
    glob, ~ or brace expansion, or, outside single quotes, $ or a backquote. Quoted operators are
    plain text, as in --sep '<|endoftext|>' or --min-age '1;06'; the line ends at an unquoted ' #'."""
    quote = None
    for i, ch in enumerate(cmd):
        if quote == "'":
            quote = None if ch == "'" else quote
        elif ch in "$`":
            return True
        elif quote == '"':
            quote = None if ch == '"' else quote
        elif ch == "\\":
            return True  # an escaped character: leave it to the shell
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or cmd[i - 1].isspace()):
            return False
        elif ch in "|&;<>()*?[~{":
            return True
    return False


def test_plain_commands_are_told_apart_from_shell_lines():
    assert _plain_cli_argv("lora-project train kids --set lora.r=8   # a comment") == [
        "train", "kids", "--set", "lora.r=8"]
    assert _plain_cli_argv("lora-project generate --prompt 'mommy want' --max-new-tokens 8") == [
        "generate", "--prompt", "mommy want", "--max-new-tokens", "8"]
    assert _plain_cli_argv('lora-project adopt --undo "$(ls -t outputs/adopt/adopt_*.json | head -1)"') is None
    assert _plain_cli_argv("lora-project inspect adapters > out.txt") is None
    assert _plain_cli_argv("mkdir -p ../x && lora-project prepare x") is None
    # operators inside quotes are the program's text, not the shell's
    assert _plain_cli_argv("lora-project extract a.txt --sep '<|endoftext|>' --out b.txt") == [
        "extract", "a.txt", "--sep", "<|endoftext|>", "--out", "b.txt"]
    assert _plain_cli_argv("lora-project extract-children c --min-age '1;06'  # (toddlers)") == [
        "extract-children", "c", "--min-age", "1;06"]
    assert _plain_cli_argv('lora-project generate --prompt "a | b"') == ["generate", "--prompt", "a | b"]
    assert _plain_cli_argv('lora-project generate --prompt "$HOME"') is None
    assert _plain_cli_argv("lora-project generate --prompt 'x' | head") is None
    assert _plain_cli_argv("lora-project generate --prompt x\\;y") is None
    assert _plain_cli_argv("lora-project inspect weights adapters/*_lora") is None
    assert _plain_cli_argv("lora-project inspect values a --module '*.q_proj'") == [
        "inspect", "values", "a", "--module", "*.q_proj"]
