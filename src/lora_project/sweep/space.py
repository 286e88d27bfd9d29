"""The search space of a sweep: ``--param`` strings parsed, validated and sampled.

Syntax of one ``--param``:

* ``section.key=V1,V2,...``: a list of values (categorical; what the grid sampler enumerates).
  Each value is read as YAML (``2e-4``, ``true``); for list fields such as
  ``lora.target_modules`` one value is names joined by ``+``: ``q_proj+v_proj``.
* ``section.key=LO:HI`` or ``LO:HI:log``: a range, uniform or log-uniform; integer fields
  (``lora.r``, ``training.max_steps``) sample integers.

Every value of a list and both ends of a range are checked by the same validation as
``train`` (:func:`lora_project.config.build_config`) on top of the sweep's base config, before
any trial starts. A range's inner values lie between two valid ends, so they are valid for
the fields swept here (all have interval constraints).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import yaml

from lora_project.config import SECTIONS, ConfigError, RunConfig, build_config, merge_sources, safe_load_yaml, short
from lora_project.errors import UserError, did_you_mean

# Settings that a sweep cannot vary: the base model is loaded once with these for every trial,
# tracking must stay one place, and where trials run (cluster) is no hyper-parameter.
FIXED = {"training.precision", "training.device", "training.threads"}
FIXED_SECTIONS = {"model", "tracking", "cluster"}
GRID_LIMIT = 10_000  # combinations; a grid beyond this is certainly a typo


@dataclass
class ParamSpec:
    """One swept setting: a list of values or a numeric range."""
    text: str  # as given, for messages and records
    key: str  # "section.name"
    kind: str  # "choice" | "float" | "int"
    choices: list = field(default_factory=list)  # Optuna-storable values (list fields joined by '+')
    low: float | None = None
    high: float | None = None
    log: bool = False
    is_list: bool = False  # the config field holds a list of names

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    def to_config(self, value: Any) -> Any:
        """An Optuna value as the config field holds it."""
        if self.is_list:
            return [v for v in str(value).split("+") if v]
        return value

    def suggest(self, trial) -> Any:
        """Sample (or, for an enqueued trial, read back) this setting's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return ", ".join(map(str, self.choices))
        return f"{self.low:g} .. {self.high:g}{' (log)' if self.log else ''}"


def _field_default(section: str, name: str, text: str):
    if section not in SECTIONS:
        raise UserError(f"--param {_cut(text)}: unknown section '{section}'{did_you_mean(section, SECTIONS)}")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if name not in fields:
        raise UserError(f"--param {_cut(text)}: unknown key '{section}.{name}'{did_you_mean(name, fields)}")
    return getattr(SECTIONS[section](), name)


def _yaml_value(raw: str) -> Any:
    try:
        return safe_load_yaml(raw)
    except yaml.YAMLError:
        return raw


def _cut(text: str, limit: int = 120) -> str:
    """A --param as given, cut for an error line."""
    return text if len(text) <= limit else text[: limit - 15] + f"...[{len(text)} chars]"


def _as_float(value: Any) -> Any:
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value  # left for validation to name


def _number(raw: str, text: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"--param {_cut(text)}: range end {raw!r} is not a number "
                        "(ranges are LO:HI or LO:HI:log)") from None


def parse_param(text: str) -> ParamSpec:
    """Parse one ``--param`` string (syntax checks only; values are validated by `validate`)."""
    if "=" not in text:
        raise UserError(f"--param {_cut(text)}: expected section.key=V1,V2 or section.key=LO:HI[:log], "
                        "e.g. lora.r=4,8 or training.lr=1e-4:3e-3:log")
    key, _, rhs = text.partition("=")
    key, rhs = key.strip(), rhs.strip()
    parts = [p for p in key.split(".")]
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--param {_cut(text)}: key must be section.key, e.g. lora.r or training.lr")
    section, name = parts
    default = _field_default(section, name, text)
    if section in FIXED_SECTIONS or key in FIXED:
        raise UserError(f"--param {_cut(text)}: {key} cannot be swept (the base model is loaded once for all "
                        "trials and tracking goes to one place); set it with --set")
    if not rhs:
        raise UserError(f"--param {_cut(text)}: no values after '='")
    is_list = isinstance(default, list)
    if ":" in rhs and "," not in rhs and not is_list and not isinstance(default, (bool, str)):
        bits = rhs.split(":")
        if len(bits) not in (2, 3) or (len(bits) == 3 and bits[2].strip() != "log"):
            raise UserError(f"--param {_cut(text)}: a range is LO:HI or LO:HI:log")
        low, high = _number(bits[0], text), _number(bits[1], text)
        log = len(bits) == 3
        if not low < high:
            raise UserError(f"--param {_cut(text)}: the range's low end must be below its high end")
        if log and low <= 0:
            raise UserError(f"--param {_cut(text)}: a log range needs a low end above 0")
        is_int = isinstance(default, int)
        if is_int and not (float(low).is_integer() and float(high).is_integer()):
            raise UserError(f"--param {_cut(text)}: {key} is an integer; give integer range ends")
        return ParamSpec(text, key, "int" if is_int else "float", low=low, high=high, log=log)
    raws = [r.strip() for r in rhs.split(",")]
    if any(not r for r in raws):
        raise UserError(f"--param {_cut(text)}: empty value in the list")
    if is_list:
        choices = ["+".join(n.strip() for n in r.split("+") if n.strip()) for r in raws]
    else:
        choices = [_yaml_value(r) for r in raws]
        if isinstance(default, float):  # YAML 1.1 reads '1e-4' as a string
            choices = [_as_float(c) for c in choices]
        bad = [c for c in choices if not isinstance(c, (bool, int, float, str)) or c is None]
        if bad:
            raise UserError(f"--param {_cut(text)}: {short(bad[0])} is not a single value")
    if len(set(map(repr, choices))) != len(choices):
        raise UserError(f"--param {_cut(text)}: a value is listed twice")
    return ParamSpec(text, key, "choice", choices=choices, is_list=is_list)


def _nested(updates: dict[str, Any]) -> dict:
    out: dict[str, dict] = {}
    for key, value in updates.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def trial_config(base: dict, specs: list[ParamSpec], values: dict[str, Any], origin: str = "sweep trial") -> RunConfig:
    """The run config of one trial: the sweep's base config with the sampled values."""
    updates = {s.key: s.to_config(values[s.key]) for s in specs}
    return build_config(merge_sources([("sweep base config", base), (origin, _nested(updates))]))


def parse_space(texts: list[str], base: dict, sampler: str) -> list[ParamSpec]:
    """Parse and validate every ``--param`` on the base config; any problem is one UserError line."""
    if not texts:
        raise UserError("name at least one --param to sweep, e.g. --param lora.r=4,8 --param training.lr=1e-4:1e-3:log")
    specs = [parse_param(t) for t in texts]
    keys = [s.key for s in specs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UserError(f"--param {twice[0]} is given twice; list all its values in one --param")
    for s in specs:
        ends = s.choices if s.kind == "choice" else [int(s.low) if s.kind == "int" else s.low,
                                                      int(s.high) if s.kind == "int" else s.high]
        for v in ends:
            try:
                trial_config(base, [s], {s.key: v}, origin=f"--param {s.key}")
            except ConfigError as exc:
                raise UserError(f"--param {_cut(s.text)}: value {short(v)}: {'; '.join(exc.problems)}") from None
    if sampler == "grid":
        ranges = [s.text for s in specs if s.kind != "choice"]
        if ranges:
            raise UserError(f"--sampler grid needs lists of values, not ranges: --param {_cut(ranges[0])}")
        points = grid_points(specs)
        for point in points:  # combinations can break cross-field rules (orthogonal init needs an even r)
            try:
                trial_config(base, specs, point)
            except ConfigError as exc:
                combo = ", ".join(f"{k}={v}" for k, v in point.items())
                raise UserError(f"grid point {combo}: {'; '.join(exc.problems)}") from None
    return specs


def grid_points(specs: list[ParamSpec]) -> list[dict[str, Any]]:
    """Every combination of the listed values, in the order given on the command line."""
    size = 1
    for s in specs:
        size *= len(s.choices)
    if size > GRID_LIMIT:
        raise UserError(f"the grid has {size:,} combinations (more than {GRID_LIMIT:,}); use --sampler tpe or random")
    return [dict(zip([s.key for s in specs], combo)) for combo in itertools.product(*[s.choices for s in specs])]
