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



# The results page (docs/results.md): today's figures, each with its command, CPU class and date;
# the README quotes it and nothing else.

RESULTS = REPO / "docs" / "results.md"
_ROW_HEADER = "| figure | value | command | CPU | date |"
_NOT_YET = "**not measured yet**"
# a figure in prose: a number and its unit ("295 s", "2,130 MiB", "1.64x", "518 tests"); "~167 tokens/s"
# is an estimate computed in the text, not a measurement
_FIGURE = re.compile(r"(?<![\w.,~])\d[\d,]*(?:\.\d+)?(?: ?x\b| (?:s|min|minutes|MiB|GiB|tokens/s|pairs/s|GFLOP/s|tests)\b)")


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row; a | inside a `code span` does not split."""
    cells, cell, in_code = [], "", False
    for ch in line.strip()[1:-1]:
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return [*cells, cell.strip()]


def _tables(text: str, header: str) -> list[list[tuple[int, list[str]]]]:
    """Every table whose header line is `header`: its body rows as (line number, cells)."""
    lines, tables = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == header:
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append((j + 1, _cells(lines[j])))
                j += 1
            tables.append(rows)
    return tables


def _machines(text: str) -> dict[str, set[str]]:
    """The machines table: CPU label -> the dates it was used."""
    (rows,) = _tables(text, "| label | CPU | matmul peak, 2 threads (`lora-project benchmark`) | used |")
    return {cells[0]: set(re.findall(r"\d{4}-\d{2}-\d{2}", cells[3])) for _, cells in rows}


def _prose(text: str) -> str:
    """Markdown without fenced blocks and inline code: what a reader takes as figures."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def test_every_figure_on_the_results_page_has_a_command_a_cpu_class_and_a_date():
    text = RESULTS.read_text()
    machines = _machines(text)
    assert {"AMX Xeon", "Zen 5", "AVX2 EPYC"} <= set(machines), machines
    tables = _tables(text, _ROW_HEADER)
    assert len(tables) >= 6, "one table per area: training, evaluation speed, accuracy, suite, data, ..."
    rows = [row for table in tables for row in table]
    assert len(rows) >= 40, len(rows)
    for line, cells in rows:
        where = f"docs/results.md:{line}"
        assert len(cells) == 5, f"{where}: {len(cells)} cells, expected figure | value | command | CPU | date"
        figure, value, command, cpu, date = cells
        assert figure and value, f"{where}: a figure needs its name and value"
        commands = re.findall(r"`([^`]+)`", command)
        assert any(re.search(r"(^|\s)(lora-project|make) \w", c) for c in commands), \
            f"{where}: no command (a `lora-project ...` or `make ...` code span) in {command!r}"
        if value == _NOT_YET:
            assert cpu == date == "-", f"{where}: a figure not measured yet has no CPU class or date"
            continue
        assert _NOT_YET not in value and cpu in machines, \
            f"{where}: CPU class {cpu!r} is not one of the machines table's labels {sorted(machines)}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), f"{where}: date {date!r} is not YYYY-MM-DD"
        assert date in machines[cpu], f"{where}: the machines table does not list {cpu!r} as used on {date}"


def test_results_page_keeps_places_for_this_sessions_new_areas():
    text = RESULTS.read_text()
    for command in ("lora-project benchmark --scaling", "lora-project evaluate --babylm",
                    "lora-project benchmark --babylm", "lora-project benchmark --blimp"):
        assert f"`{command}" in text, command


def test_readme_quotes_its_figures_from_the_results_page():
    """A figure the README gives (a number with a unit, outside code) appears on the results
    page with the same value; the README points to the page."""
    readme = (REPO / "README.md").read_text()
    assert "(docs/results.md)" in readme
    results = RESULTS.read_text()
    figures = _FIGURE.findall(_prose(readme))
    assert len(figures) >= 4, figures  # the timing paragraph quotes the page
    missing = [f for f in figures if not re.search(rf"(?<![\w.,]){re.escape(f)}(?![\w])", results)]
    assert not missing, f"README figures not on docs/results.md with the same value (update the page's row): {missing}"


def test_research_notes_and_architecture_are_linked_and_notes_start_with_the_results_page():
    notes_head = "\n".join((REPO / "docs" / "research_notes.md").read_text().splitlines()[:8])
    assert "(results.md)" in notes_head, "the research notes open with a link to the results page"
    readme = (REPO / "README.md").read_text()
    assert "(docs/architecture.md)" in readme


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_readme_and_docs_resolves():
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for f in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose_keep_links(f.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not followed (no network)
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            assert dest.exists(), f"{f.relative_to(REPO)}: link to {target} does not resolve"
            if anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
                assert anchor in slugs, f"{f.relative_to(REPO)}: no heading for #{anchor} in {dest.name}"
            checked += 1
    assert checked >= 5, checked


def _prose_keep_links(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_architecture_page_names_every_layered_package_and_only_what_exists():
    """docs/architecture.md lists every package of the import-linter contract, and every file,
    folder or name it mentions exists (a rename must update the page); `cluster/` may be coming."""
    import tomllib

    text = (REPO / "docs" / "architecture.md").read_text()
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contract if c["type"] == "layers")
    packages = [m.strip().removeprefix("lora_project.") for layer in layers for m in re.split(r"[:|]", layer)]
    assert len(packages) >= 15, packages
    rows = [_cells(line)[1] for line in text.splitlines() if line.startswith("| ") and len(_cells(line)) == 4]
    for package in packages:
        assert any(f"`{package}/`" in r or f"`{package}.py`" in r or f"`{package}`" in r for r in rows), \
            f"docs/architecture.md: no layer row for lora_project.{package}"
    src = REPO / "src" / "lora_project"
    code = "\n".join(p.read_text() for p in [*src.rglob("*.py"), *(REPO / "tests").glob("*.py")])
    for line in text.splitlines():
        for span in re.findall(r"`([^`\n]+)`", line):
            if "coming" in line and span.startswith("cluster"):
                continue
            if re.fullmatch(r"[\w./]+(\.py|\.md|\.yaml|/)", span):
                found = [(base / span).exists() for base in (src, REPO, REPO / "config")]
                found.append(span.endswith(".py") and "/" not in span and any(src.rglob(span)))
                assert any(found), f"docs/architecture.md names {span!r}, which does not exist"
            elif re.fullmatch(r"[A-Za-z]\w*_\w*|[A-Z]\w+", span):  # a Python name such as add_config_args, UserError
                assert re.search(rf"\b{span}\b", code), f"docs/architecture.md names {span!r}, which the code does not define"


def test_docs_paragraphs_that_cite_the_results_page_quote_it():
    """In the guides, a paragraph that cites docs/results.md gives its figures as the page does."""
    results = RESULTS.read_text()
    checked = 0
    for f in sorted((REPO / "docs").glob("*.md")):
        if f.name in ("results.md", "research_notes.md", "api_reference.md"):
            continue  # the page itself; the dated history; generated from docstrings
        for paragraph in re.split(r"\n\s*\n", _prose_keep_links(f.read_text())):
            if "results.md" not in paragraph:
                continue
            for figure in _FIGURE.findall(re.sub(r"`[^`\n]*`", "", paragraph)):
                checked += 1
                assert re.search(rf"(?<![\w.,]){re.escape(figure)}(?![\w])", results), \
                    f"{f.name}: {figure!r} is not on docs/results.md (quote the page's value)"
    assert checked >= 3, checked
