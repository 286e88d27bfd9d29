"""The project modules the adoption workflow uses, imported in one place.

Light at import time: only the base, config and data layers (no torch, no transformers, no
MLflow); the heavy parts are imported inside the functions that need them.
"""

from __future__ import annotations

from lora_project.config import load_project_config  # noqa: F401
from lora_project.data.catalog import (  # noqa: F401
    COLUMNS,
    append_rows,
    load_catalog,
    parse_catalog,
    remove_rows,
)
from lora_project.errors import UserError, did_you_mean  # noqa: F401
from lora_project.models.adapter import METADATA_FILE, AdapterMetadata, check_adapter_dir  # noqa: F401
from lora_project.paths import _NAME_RE, ProjectPaths  # noqa: F401
from lora_project.utils.io_utils import (  # noqa: F401
    atomic_write_bytes,
    atomic_write_json,
    default_mode,
    fsync_dir,
    fsync_tree,
    json_text,
)
from lora_project.utils.interrupts import acknowledge, shielded  # noqa: F401
from lora_project.utils.mlflow_utils import default_tracking_uri, resolve_tracking_uri  # noqa: F401
from lora_project.utils.provenance import sha256_file  # noqa: F401
