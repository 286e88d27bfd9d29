"""lora-project: a LoRA workbench for small causal language models.

The package has no import-time side effects; heavy libraries (torch, transformers,
peft, mlflow) are imported inside the functions that need them so that
`lora-project --help` and config validation stay fast.
"""

__version__ = "0.1.0"
