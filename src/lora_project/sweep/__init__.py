"""Hyper-parameter sweeps: an Optuna study whose trials are ordinary training runs (see study.py)."""
