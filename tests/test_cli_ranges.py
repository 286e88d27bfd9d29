"""Every numeric option and config field has a range, checked before any work.

The parser walk finds every option of every subcommand (`inspect weights`, `catalog add` ...
included). A numeric option must use `cli._common.Range` (a plain `type=int`/`float` fails the
walk), and for each one the value just outside each bound is refused by the real CLI entry point
(exit 2, one `error:` line naming the option and its range, nothing written) while the value at
each bound parses. The config walk does the same for every numeric field of every config section
through `build_config`. All in this process, no model loaded: the refusals happen in the parser
or the config check, before a command starts. Runs in about a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
from conftest import assert_user_error, run_cli, snapshot

from lora_project.cli import build_parser
from lora_project.cli._common import Range


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _subcommands(child, path + (name,))


COMMANDS = dict(_subcommands(build_parser()))


def _is_numeric(action: argparse.Action) -> bool:
    if isinstance(action.type, Range) or action.type in (int, float):
        return True
    return isinstance(action.default, (int, float)) and not isinstance(action.default, bool)


NUMERIC = [(words, a) for words, p in COMMANDS.items() for a in p._actions
           if a.option_strings and _is_numeric(a)]


def _required_args(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for what the subcommand requires, so a parse can succeed."""
    out: list[str] = []
    grouped = {id(a) for g in parser._mutually_exclusive_groups for a in g._group_actions}
    for g in parser._mutually_exclusive_groups:
        if g.required:
            out += [g._group_actions[0].option_strings[0], "x"]
    for a in parser._actions:
        if a.option_strings and a.required and id(a) not in grouped:
            out += [a.option_strings[0], a.choices[0] if a.choices else "x"]
    for a in parser._actions:
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction) and a.nargs not in ("?", "*"):
            out.append("x")
    return out


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _outside(rng: Range) -> list:
    step = (lambda x, d: x + d) if rng.kind is int else (lambda x, d: math.nextafter(x, x + d))
    low = rng.lo if rng.lo_open else step(rng.lo, -1)
    return [low, step(rng.hi, 1)]


def _at(rng: Range) -> list:
    low = math.nextafter(rng.lo, math.inf) if rng.lo_open else rng.lo
    return [low, rng.hi]


def _id(item) -> str:
    words, action = item
    return " ".join(words) + " " + action.option_strings[-1]


def test_the_walk_finds_every_subcommand_and_their_numeric_options():
    assert {"train", "train-batch", "evaluate", "generate", "profile", "sweep", "ui", "benchmark", "merge",
            "generate-data", "inspect weights", "inspect values", "inspect compare", "catalog add",
            "adopt"} <= {" ".join(w) for w in COMMANDS}
    assert len(NUMERIC) >= 25


@pytest.mark.parametrize("item", NUMERIC, ids=[_id(i) for i in NUMERIC])
def test_every_numeric_option_has_a_range(item):
    _words, action = item
    assert isinstance(action.type, Range), (
        f"{action.option_strings[-1]} is numeric without a range: declare it with cli._common.add_number")
    assert action.type.lo < action.type.hi
    if action.default is not None:
        assert action.type.contains(action.default), "the default is outside the option's own range"


@pytest.mark.parametrize("item", NUMERIC, ids=[_id(i) for i in NUMERIC])
def test_a_value_just_outside_the_range_is_refused_naming_option_and_range(item, project):
    words, action = item
    rng = action.type
    flag = action.option_strings[-1]
    before = snapshot(project)
    for value in _outside(rng):
        proc = run_cli(*words, f"{flag}={_text(value)}", cwd=project)
        assert_user_error(proc, flag, rng.describe())
    assert snapshot(project) == before


@pytest.mark.parametrize("item", NUMERIC, ids=[_id(i) for i in NUMERIC])
def test_a_value_at_each_bound_is_accepted_by_the_parser(item):
    words, action = item
    flag = action.option_strings[-1]
    parser = build_parser()
    for value in _at(action.type):
        args = parser.parse_args([*words, *_required_args(COMMANDS[words]), f"{flag}={_text(value)}"])
        assert getattr(args, action.dest) == value


def test_range_refusals_are_one_short_line_even_for_a_huge_value(project):
    proc = run_cli("generate-data", "--seed", "9" * 5000, cwd=project)
    assert_user_error(proc, "--seed", "an integer from 0 to 2^63-1")
    assert len(proc.stderr) < 300


@pytest.mark.parametrize("args,fragments", [
    (["train", "toddler_data", "--seeds", f"1,{2**63}"], ["--seeds", "2^63-1"]),
    (["train", "toddler_data", "--seeds", "-3"], ["--seeds", "from 1 to 100"]),
    (["train-batch", "--all", "--seeds", "0"], ["--seeds", "from 1 to 100"]),
    (["generate", "--prompt", "hi", "--seed", str(2**64)], ["--seed", "2^63-1"]),
    (["profile", "--text", "x.txt", "--samples", "-5"], ["--samples", "from 1 to"]),
    (["sweep", "toddler_data", "--keep-best", "-1"], ["--keep-best"]),
    (["ui", "--port", "70000"], ["--port", "from 1 to 65535"]),
    (["evaluate", "--text", "x", "--max-tokens", "-1"], ["--max-tokens", "from 0"]),
])
def test_huge_seeds_and_negative_counts_are_refused_before_any_work(args, fragments, project):
    before = snapshot(project)
    assert_user_error(run_cli(*args, cwd=project), *fragments)
    assert snapshot(project) == before


@pytest.mark.parametrize("shape", ["7x16", "131073x1", "8x0", "8x4097"])
def test_benchmark_shapes_outside_their_ranges_are_refused_before_measuring(shape, project):
    before = snapshot(project)
    assert_user_error(run_cli("benchmark", "--quick", "--shapes", shape, cwd=project), "--shapes",
                      "from 8 to 131072", "from 1 to 4096")
    assert snapshot(project) == before


def test_benchmark_shapes_at_their_bounds_parse():
    from lora_project.benchmark import parse_shapes

    assert parse_shapes("8x1,131072x4096") == [(8, 1), (131072, 4096)]


def test_generate_data_at_the_largest_seed_runs(project):
    proc = run_cli("generate-data", "--kind", "kids", "--lines", "1", "--seed", str(2**63 - 1),
                   "--out", "data/raw/one.txt", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert len((project / "data" / "raw" / "one.txt").read_text().splitlines()) == 1


# --- config fields --------------------------------------------------------------------------


def _config_fields():
    from lora_project.config import SECTIONS

    for section, cls in SECTIONS.items():
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            numeric = (isinstance(default, (int, float)) and not isinstance(default, bool)) or \
                f.metadata.get("min") is not None
            if numeric:
                yield section, f


CONFIG_FIELDS = list(_config_fields())


def _is_int_field(f) -> bool:
    return str(f.type).split("|")[0].strip() == "int"


def _field_outside(f) -> list:
    lo, hi = f.metadata["min"], f.metadata["max"]
    if _is_int_field(f):
        return [lo if f.metadata["min_exclusive"] else lo - 1, hi + 1]
    return [lo if f.metadata["min_exclusive"] else math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)]


def _field_at(f) -> list:
    lo, hi = f.metadata["min"], f.metadata["max"]
    if f.metadata["min_exclusive"]:
        lo = lo + 1 if _is_int_field(f) else math.nextafter(lo, math.inf)
    return [lo, hi]


# Fields whose bound is only valid with another field set (their cross-field rules).
COMPANIONS = {"training.warmup_steps": {"max_steps": 0}, "training.early_stopping_patience": {"eval_interval": 1}}


def test_the_config_walk_covers_every_section():
    assert {s for s, _ in CONFIG_FIELDS} == {"lora", "training", "cluster"} and len(CONFIG_FIELDS) >= 20


@pytest.mark.parametrize("section,f", CONFIG_FIELDS, ids=[f"{s}.{f.name}" for s, f in CONFIG_FIELDS])
def test_every_numeric_config_field_has_a_range_and_its_bounds_hold(section, f):
    from lora_project.config import ConfigError, build_config, field_range

    name = f"{section}.{f.name}"
    assert f.metadata.get("min") is not None and f.metadata.get("max") is not None, f"{name} has no full range"
    for value in _field_outside(f):
        with pytest.raises(ConfigError) as exc:
            build_config({section: {f.name: value}})
        msg = str(exc.value)
        assert name in msg and field_range(f) in msg, msg
    for value in _field_at(f):
        cfg = build_config({section: {f.name: value, **COMPANIONS.get(name, {})}})
        assert getattr(getattr(cfg, section), f.name) == value


def test_a_config_value_out_of_range_is_one_line_naming_field_and_range(project):
    before = snapshot(project)
    proc = run_cli("train", "toddler_data", "--set", "training.epochs=1e9", cwd=project)
    assert_user_error(proc, "training.epochs", "range above 0 to 100000")
    assert snapshot(project) == before


def test_the_largest_seed_runs_through_every_seeded_command(project):
    """At the top of the seed range, the commands that seed something run without a traceback:
    sampling (seed + prompt index), a profile's prompts and samples, and training with --seeds."""
    top = str(2**63 - 1)
    proc = run_cli("generate", "--prompt", "more", "--prompt", "where", "--temperature", "0.8", "--seed", top,
                   "--max-new-tokens", "2", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_cli("prepare", "toddler_data", "--no-tokens", cwd=project).returncode == 0
    proc = run_cli("profile", "--dataset", "toddler_data", "--base", "--samples", "2", "--max-new-tokens", "2",
                   "--seed", top, "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", "toddler_data", "--seeds", f"0,{top}", "--no-mlflow", "--no-progress",
                   "--set", "training.max_steps=1", "--set", "training.eval_interval=0", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "adapters" / f"toddler_data_s{top}_lora" / "adapter_model.safetensors").is_file()
