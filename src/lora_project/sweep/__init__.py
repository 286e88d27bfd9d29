"""Hyper-parameter sweeps: an Optuna study whose trials are ordinary training runs (runner.py runs one, study.py holds its trials)."""
