"""How one training run is carried out and recorded, apart from what it trains (the RunConfig).

Every way of training builds one `RunOptions` and passes it on: `train`, `train --seeds`,
`train-batch` (sequential and fused), sweep trials, the demo, and the cluster runner; the single
run recipe is `lora_project.training.single.train_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunOptions:
    """The options of one training run (defaults: what `lora-project train NAME` does)."""

    adapter_name: str | None = None
    """Saved as ``adapters/<adapter_name>_lora/``; None: the dataset's name."""

    overwrite: bool = False
    """Replace an existing adapter of that name (without it the run is refused before any work)."""

    resume: bool = False
    """Continue the newest checkpoint of this adapter, in its experiment folder and MLflow run;
    refused when the config, base model or data differ."""

    use_mlflow: bool = True
    """Track the run in MLflow (also needs ``tracking.mlflow`` in the config); False: files only."""

    progress: bool = True
    """Show a progress bar while training."""

    parent_run_id: str | None = None
    """MLflow run the run is nested under (a batch's, a sweep's); None: a top-level run."""

    run_kind: str = "single"
    """What started the run, recorded in results.json and as the MLflow tag ``kind``:
    single, batch, fused, sweep, ..."""

    tags: Mapping[str, str] = field(default_factory=dict)
    """Extra MLflow tags of the run (a sweep's name and trial number)."""

    params: Mapping[str, Any] = field(default_factory=dict)
    """Extra MLflow parameters of the run, beside the config's (a sweep trial's sampled values)."""

    extra_callbacks: Sequence = ()
    """Callbacks that observe the training loop after the run's own (a sweep's pruning callback)."""

    on_checkpoint: Callable[[Any], None] | None = None
    """Called with each checkpoint folder once it is written (a cluster task mirrors it to the shared
    project folder, so that a retry on another node resumes from it)."""

    log: Callable[[str], None] = print
    """Where the run's progress lines go (one string per call)."""
