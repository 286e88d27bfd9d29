#!/usr/bin/env python3
"""Write docs/api_reference.md from the package's docstrings (`make docs`).

Reads the source with `ast` (nothing is imported, so it is fast and has no side effects):
for every module under src/lora_project, its docstring, then each public class (with its
public methods) and function: signature and docstring. `tests/test_docs.py` fails when the
committed file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "lora_project"
OUT = ROOT / "docs" / "api_reference.md"


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, drop_self: bool) -> str:
    args = node.args
    parts: list[str] = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (a, d) in enumerate(zip(positional, defaults)):
        if drop_self and i == 0 and a.arg in ("self", "cls"):
            continue
        text = a.arg + (f": {ast.unparse(a.annotation)}" if a.annotation else "")
        parts.append(text + (f" = {ast.unparse(d)}" if d is not None else ""))
    if args.vararg:
        parts.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        parts.append("*")
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        text = a.arg + (f": {ast.unparse(a.annotation)}" if a.annotation else "")
        parts.append(text + (f" = {ast.unparse(d)}" if d is not None else ""))
    if args.kwarg:
        parts.append(f"**{args.kwarg.arg}")
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{node.name}({', '.join(parts)}){ret}"


def _doc(node) -> str:
    doc = ast.get_docstring(node)
    return doc.strip() if doc else "*(no docstring)*"


def _public(name: str) -> bool:
    return not name.startswith("_")


def module_section(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    name = ".".join(rel.parts).removesuffix(".__init__")
    lines = [f"## `{name}`", "", _doc(tree), ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            lines += [f"### `{_signature(node, False)}`", "", _doc(node), ""]
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            lines += [f"### class `{node.name}{f'({bases})' if bases else ''}`", "", _doc(node), ""]
            for item, after in zip(node.body, node.body[1:] + [None]):
                # A field with a docstring under it (an attribute docstring, as in RunOptions).
                if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and _public(item.target.id)
                        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    default = f" = {ast.unparse(item.value)}" if item.value is not None else ""
                    text = " ".join(after.value.value.split())
                    lines += [f"- `{item.target.id}: {ast.unparse(item.annotation)}{default}`: {text}"]
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(item.name):
                    doc = ast.get_docstring(item)
                    lines += [f"- `{_signature(item, True)}`" + (f": {doc.strip().splitlines()[0]}" if doc else "")]
            if lines[-1] != "":
                lines.append("")
    return lines


def render() -> str:
    files = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts
                   and p.name not in ("__main__.py",))
    lines = ["# API reference", "",
             "Generated from the docstrings by `scripts/docs/gen_api_reference.py` (`make docs`); "
             "do not edit by hand. A test fails when this file is stale.", ""]
    for path in files:
        section = module_section(path)
        if len(section) > 4 or ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))):
            lines += section
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write docs/api_reference.md from the package's docstrings.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        if current != text:
            print("docs/api_reference.md is stale; run: make docs", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({text.count(chr(10))} lines)")
