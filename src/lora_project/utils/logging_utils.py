"""Keep the terminal for our own messages: silence libraries' progress bars and INFO logs."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Called once by the CLI before heavy imports; library warnings that matter still show."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic", "transformers", "peft", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Deprecation notices from inside transformers/PEFT are for their developers, not our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # In a notebook without ipywidgets, tqdm.auto falls back to text bars and says so.
    warnings.filterwarnings("ignore", message="IProgress not found")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
