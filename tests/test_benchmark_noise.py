"""Trustworthy numbers (scn_fast.benchmark.noise): the spread of repeats, the noisy flag, the busy
warning, and how the table shows them."""

from __future__ import annotations

import pytest

from scn_fast.benchmark import noise
from scn_fast.benchmark.records import RECORD_FIELDS, make_record
from scn_fast.benchmark.report import format_table


def test_spread_is_range_over_median():
    assert noise.spread([1.0, 1.1, 1.2]) == pytest.approx(0.2 / 1.1)
    assert noise.spread([2.0]) == 0.0
    assert noise.spread([]) is None and noise.spread(None) is None


def test_noisy_when_repeats_or_floor_spread_or_below_floor():
    steady = [1.00, 1.02, 1.05]
    assert noise.noise_reasons(steady, steady, 1.3) == []
    assert "repeats spread by 18%" in noise.noise_reasons([1.0, 1.1, 1.2], steady, 1.3)[0]
    assert noise.noise_reasons(steady, [0.5, 0.6, 0.7], 1.3)[0].startswith("floor's repeats")
    assert noise.noise_reasons(steady, steady, 0.65) == ["time below its floor (0.65x)"]
    assert noise.noise_reasons([1.0, 1.0, 1.09]) == []  # 9%: within the limit
    assert noise.noise_reasons([1.0, 1.0, 1.11]) != []  # 11%: noisy


def test_spread_fields_fill_the_record():
    f = noise.spread_fields([1.0, 1.3, 1.1], [0.5, 0.5, 0.5], 2.0)
    assert set(f) <= set(RECORD_FIELDS)
    assert f["min_s"] == 1.0 and f["max_s"] == 1.3 and f["floor_min_s"] == f["floor_max_s"] == 0.5
    assert f["floor_spread"] == 0.0 and f["noisy"] is True and "repeats spread" in f["noise"]
    untimed = noise.spread_fields(None)
    assert untimed["noisy"] is None and untimed["noise"] is None


def test_busy_warning_only_above_the_core_count():
    assert noise.busy_warning(load=1.9, cores=2) is None
    assert noise.busy_warning(load=2.0, cores=2) is None
    text = noise.busy_warning(load=6.8, cores=2)
    assert text is not None and "6.8" in text and "2 cores" in text


def _record(**kw):
    base = dict(
        config="tiny",
        mode="training",
        backend="extension",
        precision="fp32",
        natoms=14,
        status="ok",
        median_s=1.1,
    )
    return make_record(**{**base, **kw})


def test_table_shows_spread_and_noisy_with_reason():
    rows = [
        _record(**noise.spread_fields([1.0, 1.1, 1.3], [0.9, 0.9, 0.9], 1.2)),
        _record(backend="reference", **noise.spread_fields([1.0, 1.01, 1.02], None, 1.2)),
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert "spread" in lines[0] and "trust" in lines[0]
    assert "noisy" in lines[2] and "27%" in lines[2] and "[1]" in lines[2]
    assert lines[3].split()[-1] == "ok"
    assert "1 of 2 timed points are noisy" in table
    assert "[1] repeats spread by 27% (> 10%)" in table


def test_backend_check_reads_explain_loosely():
    """The check that the requested backend ran survives a change of explain()'s layout: extra
    fields per op, ops renamed, entries that are plain strings."""
    from scn_fast.benchmark.paths import backend_mismatch, path_spec

    tri = path_spec("triton", "fp32")
    new_layout = {
        "edge_rotation": {"ran": "triton", "variant": {"tile": 64}, "refused": {}},
        "scatter_aggregation": {"ran": "triton", "variant": {}, "refused": {}},
        "gemm_precision": {"ran": "bf16 native", "refused": {}},
    }
    assert backend_mismatch(tri, new_layout) is None
    refused = {"edge_rotation": {"ran": "reference", "refused": {"triton": "no CUDA"}}}
    assert "edge_rotation ran 'reference' (no CUDA)" in backend_mismatch(tri, refused)
    renamed = {"rotate_edges": {"ran": "triton"}, "aggregate": {"ran": "triton"}}
    assert backend_mismatch(tri, renamed) is None
    assert "did not run" in backend_mismatch(tri, {"rotate_edges": {"ran": "extension"}})
    assert (
        backend_mismatch(tri, {"edge_rotation": "triton", "scatter_aggregation": "triton"}) is None
    )
    assert "reports no op" in backend_mismatch(tri, {"gemm_precision": {"ran": "bf16 native"}})
