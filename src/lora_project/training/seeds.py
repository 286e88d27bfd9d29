"""Several seeds per result, and adapter names that say what was trained.

`--seeds 3` trains one adapter per seed: the configured `training.seed` and the next two
(42, 43, 44 by default); `--seeds 1,7,42` names them. The seed sets the adapter's initial A
and the order of the training blocks, so the spread across seeds is the run-to-run noise
that a difference between two adapters has to beat.

Adapter names come from a template (`train-batch --name-template`), e.g.
``{dataset}_r{r}_s{seed}`` -> ``kids_r8_s42``, so a retrain with new settings gets a new
name instead of overwriting the old adapter.
"""

from __future__ import annotations

import dataclasses
import re
import string

from lora_project.config import RunConfig
from lora_project.errors import UserError
from lora_project.paths import check_name
from lora_project.training.options import RunOptions

MAX_SEEDS = 100
MAX_SEED = 2**63 - 1  # training.seed's bound: what torch.manual_seed takes


def template_fields(dataset: str, cfg: RunConfig) -> dict:
    """The fields an adapter-name template may use, for one dataset and config."""
    t, lo = cfg.training, cfg.lora
    return {"dataset": dataset, "seed": t.seed, "r": lo.r, "alpha": f"{lo.alpha:g}", "lr": f"{t.lr:g}",
            "max_steps": t.max_steps, "seq_len": t.seq_len, "batch_size": t.batch_size,
            "targets": "-".join(lo.target_modules)}


def parse_seeds(spec: str | None) -> int | list[int] | None:
    """'3' -> 3 (that many seeds from training.seed on); '1,7,42' -> [1, 7, 42]; None stays None."""
    if spec is None:
        return None
    text = str(spec).strip()
    try:
        if "," in text:
            seeds = [int(x) for x in text.split(",") if x.strip()]
            if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
                raise ValueError
            return seeds
        count = int(text)
    except ValueError:
        raise UserError(f"--seeds {text[:40]!r}: give a count (3) or distinct seeds from 0 to 2^63-1 "
                        "(1,7,42)") from None
    if not 1 <= count <= MAX_SEEDS:
        raise UserError(f"--seeds {count}: a count from 1 to {MAX_SEEDS} (or a list like 1,7,42)")
    return count


def seeds_for(cfg: RunConfig, spec: int | list[int]) -> list[int]:
    """The seeds of one dataset's runs: a list as given, or `count` seeds from training.seed on."""
    return list(spec) if isinstance(spec, list) else [cfg.training.seed + i for i in range(spec)]


def with_seed(cfg: RunConfig, seed: int) -> RunConfig:
    """The same config with another training.seed."""
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=seed))


def check_template(template: str) -> None:
    """Refuse a template with unknown fields or bad syntax, naming the fields there are."""
    from lora_project.config import build_config

    known = template_fields("x", build_config({}))
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(f"--name-template {template!r}: {exc}") from None
    bad = [f for f in names if f not in known]
    if not template.strip():
        raise UserError("--name-template is empty; e.g. '{dataset}_r{r}_s{seed}'")
    if bad:
        raise UserError(f"--name-template {template!r}: unknown field {{{bad[0] if bad else ''}}}; fields: "
                        + ", ".join("{" + k + "}" for k in known))


def adapter_name(template: str, dataset: str, cfg: RunConfig) -> str:
    """The adapter name a template gives for one dataset and config (a valid folder name)."""
    check_template(template)
    try:
        name = template.format(**template_fields(dataset, cfg))
    except (ValueError, KeyError, IndexError) as exc:
        raise UserError(f"--name-template {template!r}: {exc}") from None
    return check_name(re.sub(r"[^A-Za-z0-9._-]", "-", name), "adapter name (from --name-template)")


def seeded_runs(dataset: str, cfg: RunConfig, spec, template: str | None,
                default_name: str | None = None) -> list[tuple[str, RunConfig]]:
    """(adapter name, config) per run of one dataset: one per seed when `spec` is given. Without
    a template the name is the dataset's (or `default_name`), with `_s<seed>` when seeds are given."""
    if spec is None:
        runs = [cfg]
    else:
        runs = [with_seed(cfg, s) for s in seeds_for(cfg, spec)]
    if template is None:
        stem = default_name or dataset
        return [(check_name(stem + (f"_s{c.training.seed}" if spec is not None else ""), "adapter name"), c)
                for c in runs]
    return [(adapter_name(template, dataset, c), c) for c in runs]


def check_unique(names: list[str]) -> None:
    """Two runs with one adapter name would overwrite each other: refused before any training."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two runs would both be saved as adapter '{dupes[0]}'; put {{seed}} (or the field "
                        "that differs) in the name template")


def train_seeds(paths, dataset: str, cfg: RunConfig, spec, options: RunOptions | None = None, *,
                base=None) -> dict:
    """`train NAME --seeds N`: one adapter per seed (the base loaded once, unless given); {"seeds", "runs"}.
    `options.adapter_name` is the stem of the names (default: the dataset's), `_s<seed>` appended."""
    from lora_project.models.base_model import load_base
    from lora_project.training.single import train_adapter

    opts = options or RunOptions()
    if opts.resume:
        raise UserError("--resume continues one adapter; resume each seed's adapter with --adapter-name NAME_sSEED")
    runs = seeded_runs(dataset, cfg, spec, None, opts.adapter_name)
    check_unique([n for n, _ in runs])
    base = base or load_base(cfg)
    results = []
    for i, (name, c) in enumerate(runs, 1):
        opts.log(f"[{i}/{len(runs)}] {name} (seed {c.training.seed})")
        results.append(train_adapter(paths, dataset, c, dataclasses.replace(opts, adapter_name=name), base=base))
    return {"dataset": dataset, "seeds": [c.training.seed for _, c in runs], "runs": results}
