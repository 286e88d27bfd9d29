"""The scale-out arithmetic of `benchmark --scaling` (benchmark/scaling.py), against hand-computed values."""

from __future__ import annotations

import math

import pytest

from lora_project.benchmark.scaling import (
    OVERHEAD_PHASES,
    PROJECTED_WORKERS,
    PROJECTION_MODEL,
    mean_overheads,
    net_scheduling,
    parallel_efficiency,
    projected_seconds,
    projection,
    speed_up,
)
from lora_project.errors import UserError


def test_speed_up_and_efficiency_by_hand():
    # 100 s on one CPU, 55 s on two workers: speed-up 100/55, efficiency 100/(2*55) = 0.90909...
    assert speed_up(100.0, 55.0) == pytest.approx(1.8181818, rel=1e-6)
    assert parallel_efficiency(100.0, 2, 55.0) == pytest.approx(0.9090909, rel=1e-6)
    # perfect halving is 1.0; no gain at all on 2 workers is 0.5
    assert parallel_efficiency(80.0, 2, 40.0) == 1.0
    assert parallel_efficiency(80.0, 2, 80.0) == 0.5


def test_projected_seconds_rounds_tasks_up_to_whole_waves():
    # 4 tasks on 8 workers: one wave of (30 + 2) s, plus 5 s fixed = 37 s
    assert projected_seconds(4, 8, 30.0, 2.0, 5.0) == 37.0
    # 4 tasks on 3 workers: ceil(4/3) = 2 waves: 2*32 + 5 = 69 s
    assert projected_seconds(4, 3, 30.0, 2.0, 5.0) == 69.0
    # 1000 tasks on 64 workers: ceil(15.625) = 16 waves: 16*32 + 5 = 517 s
    assert projected_seconds(1000, 64, 30.0, 2.0, 5.0) == 517.0
    # one worker: every task in sequence
    assert projected_seconds(4, 1, 30.0, 0.0, 0.0) == 120.0


def test_projection_rows_by_hand():
    rows = projection(tasks=1024, train_seconds=10.0, overhead_seconds=1.0, fixed_seconds=4.0,
                      local_one_cpu_seconds=10240.0)
    assert [r["workers"] for r in rows] == list(PROJECTED_WORKERS) == [8, 64, 512]
    # 8 workers: 128 waves * 11 s + 4 = 1412 s; speed-up 10240/1412; efficiency 10240/(8*1412)
    assert rows[0]["seconds"] == 1412.0
    assert rows[0]["speed_up"] == pytest.approx(10240 / 1412)
    assert rows[0]["efficiency"] == pytest.approx(10240 / 11296)
    # 64 workers: 16 * 11 + 4 = 180 s; 512 workers: 2 * 11 + 4 = 26 s
    assert rows[1]["seconds"] == 180.0
    assert rows[2]["seconds"] == 26.0
    assert rows[2]["efficiency"] == pytest.approx(10240 / (512 * 26))
    # efficiency falls as the fixed and per-task costs weigh more
    assert rows[0]["efficiency"] > rows[1]["efficiency"] > rows[2]["efficiency"]


def test_mean_overheads_averages_each_phase_and_sums_them():
    phases = [
        {"scheduling": 0.2, "model_load": 3.0, "data_shipping": 0.1, "result_return": 0.3},
        {"scheduling": 0.4, "model_load": 1.0, "result_return": 0.1},  # no data_shipping: counts as 0
    ]
    m = mean_overheads(phases)
    assert m["scheduling"] == pytest.approx(0.3)
    assert m["model_load"] == pytest.approx(2.0)
    assert m["data_shipping"] == pytest.approx(0.05)
    assert m["result_return"] == pytest.approx(0.2)
    assert m["total"] == pytest.approx(2.55)
    assert set(m) == set(OVERHEAD_PHASES) | {"total"}


def test_model_statement_names_its_formula():
    assert "ceil(tasks / W)" in PROJECTION_MODEL


@pytest.mark.parametrize("call", [
    lambda: speed_up(0.0, 1.0),
    lambda: speed_up(1.0, -2.0),
    lambda: speed_up(math.nan, 1.0),
    lambda: parallel_efficiency(1.0, 0, 1.0),
    lambda: parallel_efficiency(1.0, True, 1.0),
    lambda: projected_seconds(0, 8, 1.0, 0.0, 0.0),
    lambda: projected_seconds(4, 8, 1.0, -0.1, 0.0),
    lambda: projected_seconds(4, 8, 1.0, 0.0, math.inf),
    lambda: mean_overheads([]),
    lambda: mean_overheads([{"scheduling": -1.0}]),
])
def test_bad_inputs_are_user_errors(call):
    with pytest.raises(UserError):
        call()


def test_summary_and_table_by_hand():
    from lora_project.benchmark.scaling import scaling_markdown, scaling_summary

    # 4 tasks: 100 s on one CPU, 55 s on 2 workers; 20 s training and 1.5 s overhead per task, 10 s fixed
    phases = [{"scheduling": 0.1, "model_load": 1.0, "data_shipping": 0.2, "result_return": 0.2}] * 4
    s = scaling_summary(tasks=4, workers=2, local_one_cpu_seconds=100.0, cluster_seconds=55.0, train_seconds=20.0,
                        phases=phases, fixed_seconds=10.0, local_model_loads=1, cluster_model_loads=2)
    assert s["efficiency"] == pytest.approx(100 / 110)
    assert s["overheads_per_task"]["total"] == pytest.approx(1.5)
    # 8, 64 and 512 workers all run the 4 tasks in one wave: 21.5 + 10 = 31.5 s
    assert [r["seconds"] for r in s["projection"]] == pytest.approx([31.5, 31.5, 31.5])
    table = scaling_markdown(s)
    assert "| cluster | 2 | 55.0 | 1.82 | 0.91 | 2 |" in table
    assert "| local, one CPU | 1 | 100.0 | 1.00 | 1.00 | 1 |" in table
    assert "| model load | 1.00 |" in table
    assert "| 512 | 31.5 | 3.17 | 0.01 |" in table
    assert PROJECTION_MODEL in table


def test_net_scheduling_takes_out_the_wait_for_a_free_slot():
    # 2 slots, 4 tasks submitted at t=0: tasks a, b start at 1 and 2; c waits for a (free at 10), starts
    # at 10.5; d waits for b (free at 12), starts at 12.25. Its own scheduling: 1, 2, 0.5, 0.25 s.
    rows = [{"submitted_at": 0.0, "started_at": 1.0, "finished_at": 10.0, "k": "a"},
            {"submitted_at": 0.0, "started_at": 2.0, "finished_at": 12.0, "k": "b"},
            {"submitted_at": 0.0, "started_at": 12.25, "finished_at": 20.0, "k": "d"},
            {"submitted_at": 0.0, "started_at": 10.5, "finished_at": 19.0, "k": "c"}]
    out = net_scheduling(rows, 2)
    assert [(r["k"], r["scheduling"]) for r in out] == [("a", 1.0), ("b", 2.0), ("d", 0.25), ("c", 0.5)]
    assert "scheduling" not in rows[0]  # the input is not changed
    # one slot: each waits for the one before; a late submission counts from its submission
    out = net_scheduling([{"submitted_at": 0.0, "started_at": 1.0, "finished_at": 5.0},
                          {"submitted_at": 7.0, "started_at": 7.5, "finished_at": 9.0}], 1)
    assert [r["scheduling"] for r in out] == [1.0, 0.5]
    with pytest.raises(UserError):
        net_scheduling(rows, 0)


def test_projection_with_the_measured_load_per_worker_by_hand():
    from lora_project.benchmark.scaling import projection_same_load, scaling_summary

    # measured: 4 tasks on 2 workers (2 each), 100 s on one CPU; 20 s training + 1.5 s overhead per task, 10 s fixed
    phases = [{"scheduling": 0.1, "model_load": 1.0, "data_shipping": 0.2, "result_return": 0.2}] * 4
    s = scaling_summary(tasks=4, workers=2, local_one_cpu_seconds=100.0, cluster_seconds=55.0, train_seconds=20.0,
                        phases=phases, fixed_seconds=10.0, local_model_loads=1, cluster_model_loads=2)
    rows = projection_same_load(s)
    # W workers, 2W tasks: 2 waves of 21.5 s + 10 s = 53 s; local 100 s * 2W / 4 = 50 W s
    assert [(r["workers"], r["tasks"]) for r in rows] == [(8, 16), (64, 128), (512, 1024)]
    assert [r["seconds"] for r in rows] == pytest.approx([53.0] * 3)
    assert [r["efficiency"] for r in rows] == pytest.approx([50 / 53] * 3)
    assert rows[2]["speed_up"] == pytest.approx(25600 / 53)
