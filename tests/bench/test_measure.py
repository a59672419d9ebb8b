"""bench-cpu's measurement: timing statistics by hand, padding, output checks, ratios, only the predict call timed,
and rounds pooled."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from tqdm.auto import tqdm

from distilbert_cli.bench import backends, measure, render, workload

# ---- statistics by hand ---------------------------------------------------------------------------

def test_summarize_timings_by_hand():
    # 2 passes over 3 batches (sizes 1, 1, 2); per-batch medians 1.5, 3, 5 ms; pass sums 9 and 10 ms.
    timings = np.array([[1.0, 2.0, 6.0], [2.0, 4.0, 4.0]]) * 1e-3
    stats = measure.summarize_timings(timings, [1, 1, 2], full_examples=40)
    assert stats["latency_ms"]["median"] == pytest.approx(3.0)
    assert stats["latency_ms"]["p90"] == pytest.approx(3.0 + 0.8 * (5.0 - 3.0))  # linear between 2nd and 3rd
    assert stats["latency_ms"]["mean"] == pytest.approx(9.5 / 3) and stats["latency_ms"]["min"] == pytest.approx(1.5)
    assert stats["timed_pass_s"] == pytest.approx(9.5e-3)  # median of the two pass sums
    assert stats["throughput_examples_per_s"] == pytest.approx(4 / 9.5e-3)
    assert stats["full_pass_s"] == pytest.approx(9.5e-3 * 10) and stats["full_pass"] == "extrapolated"
    assert measure.summarize_timings(timings, [1, 1, 2], full_examples=4)["full_pass"] == "measured"


def test_make_batches_pads_to_the_longest_or_to_a_fixed_length():
    rows = [{"input_ids": np.array([2, 7, 3]), "attention_mask": np.ones(3, dtype=np.int64)},
            {"input_ids": np.array([2, 3]), "attention_mask": np.ones(2, dtype=np.int64)},
            {"input_ids": np.array([2, 9, 9, 3]), "attention_mask": np.ones(4, dtype=np.int64)}]
    first, second = workload.make_batches(rows, 2, None, pad_token_id=0)
    np.testing.assert_array_equal(first["input_ids"], [[2, 7, 3], [2, 3, 0]])
    np.testing.assert_array_equal(first["attention_mask"], [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(second["input_ids"], [[2, 9, 9, 3]])
    (fixed,) = workload.make_batches(rows[:1], 1, 5, pad_token_id=1)
    np.testing.assert_array_equal(fixed["input_ids"], [[2, 7, 3, 1, 1]])


def test_compare_outputs_by_hand():
    check = measure.compare_outputs(np.array([1.0, 2.5, 2.0]), np.array([1.0, 2.0, 3.0]))
    assert check["max_abs_diff"] == pytest.approx(1.0) and check["mean_abs_diff"] == pytest.approx(0.5)
    assert check["spearman"] == pytest.approx(0.5)  # ranks (1, 3, 2) vs (1, 2, 3)
    assert measure.compare_outputs(np.ones(3), np.array([1.0, 2.0, 3.0]))["spearman"] is None


def test_summary_ratios_against_the_first_model_and_best_backend():
    def row(model, backend, median):
        return {"model": model, "backend": backend, "batch_size": 1, "status": "ok", "latency_ms": {"median": median}}

    rows = [row("teacher", "eager", 30.0), row("teacher", "int8", 20.0), row("student", "eager", 15.0),
            row("student", "int8", 6.0), {"model": "student", "backend": "onnx", "batch_size": 1, "status": "skipped"}]
    summary = render.summarize([{"name": "teacher"}, {"name": "student"}], rows, [1])
    assert [(r["backend"], r["median_latency_ratio"]) for r in summary["latency_ratios"]] == [("eager", 2.0),
                                                                                             ("int8", 20 / 6)]
    best = {b["model"]: (b["backend"], b["speedup_over_eager"]) for b in summary["best_backends"]}
    assert best == {"teacher": ("int8", 1.5), "student": ("int8", 2.5)}


@pytest.mark.skipif(sys.platform != "linux", reason="the peak can only be reset on Linux (/proc/self/clear_refs)")
def test_peak_rss_keeps_the_high_water_mark_until_reset():
    mib = 2**20
    measure.release_memory()
    assert measure.reset_peak_rss()
    before = measure.peak_rss_bytes()
    block = np.ones(64 * mib // 8)  # 64 MiB, touched
    del block
    measure.release_memory()
    peak = measure.peak_rss_bytes()
    assert peak >= before + 60 * mib  # the block is gone, its peak stays
    assert measure.reset_peak_rss()
    assert measure.peak_rss_bytes() < peak - 48 * mib  # a reset starts again from what is resident now


def test_only_the_predict_call_is_timed(monkeypatch):
    clock = [0.0]  # a fake clock: the test must not depend on how busy the machine is
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def prepare(batch):
        clock[0] += 1.0  # preparing inputs is outside the timed region
        return batch

    def predict(inputs):
        clock[0] += 0.25 * inputs["input_ids"].shape[1]
        return np.zeros(1)

    backend = backends.Backend(prepare, predict, size_bytes=0, artifact="fake clock")
    batches = [{"input_ids": np.zeros((1, length), dtype=np.int64)} for length in (1, 2, 4)]
    timings = measure.time_batches(backend, batches, repeats=2, progress=tqdm(disable=True))
    np.testing.assert_array_equal(timings, [[0.25, 0.5, 1.0], [0.25, 0.5, 1.0]])


def test_rounds_pool_the_timed_passes():
    def row(model, timings, rss, status="ok"):
        return {"model": model, "backend": "eager", "batch_size": 1, "status": status, "peak_rss_bytes": rss,
                "build_s": rss / 10, "timings": np.asarray(timings), "batch_examples": [1, 1], "full_examples": 4}

    first = [row("a", [[1.0, 3.0]], 10), row("b", [[2.0, 2.0]], 20)]
    second = [row("b", [[4.0, 4.0]], 15), row("a", [[5.0, 7.0], [9.0, 11.0]], 30)]
    pooled = measure.pool_rounds([first, second])
    assert [r["model"] for r in pooled] == ["a", "b"]
    a, b = pooled
    # a's per-batch medians over the passes [1, 5, 9] and [3, 7, 11] are 5 and 7.
    assert a["latency_ms"]["median"] == pytest.approx(6000.0) and a["timed_passes"] == 3
    assert (a["peak_rss_bytes"], a["build_s"]) == (30, 1.0)  # the highest peak, the first round's build
    assert b["latency_ms"]["median"] == pytest.approx(3000.0) and b["full_pass_s"] == pytest.approx(12.0)
    assert not {"timings", "batch_examples", "full_examples"} & set(a)


