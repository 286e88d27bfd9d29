"""`benchmark`: this machine's matmul peak and our trainer's throughput and memory.

Full mode uses the configured base model (the embedded SmolLM2-135M by default) and the
toddler corpus; quick mode builds a tiny Llama in code and runs in seconds (used in CI).
Results go to ``outputs/metrics/benchmark_<timestamp>.{json,md}``.

Throughput is timed over optimizer steps after one warm-up micro-step; the fraction of
peak uses 4 x parameters FLOPs per token (forward 2x, input-gradient backward 2x).
"""

from __future__ import annotations

from lora_project.benchmark.blimp import blimp_markdown, blimp_speed
from lora_project.benchmark.matrix import (
    cross_matrix,
    matrix_figure,
    matrix_markdown,
    plot_matrix,
)
from lora_project.benchmark.reference import compare_with_reference
from lora_project.benchmark.report import benchmark_report, log_to_mlflow, write_report
from lora_project.benchmark.speed import (
    inference_speed,
    load_times,
    matmul_gflops,
    parse_shapes,
    run_benchmark,
)

__all__ = [
    "matmul_gflops",
    "parse_shapes",
    "inference_speed",
    "load_times",
    "run_benchmark",
    "log_to_mlflow",
    "write_report",
    "benchmark_report",
    "compare_with_reference",
    "cross_matrix",
    "matrix_figure",
    "plot_matrix",
    "matrix_markdown",
    "blimp_speed",
    "blimp_markdown",
]
