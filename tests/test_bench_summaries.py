"""The benchmarks' summary rows (the issues' targets) recomputed on the CPU from the numbers a GPU run
stored in ``benchmarks/results/``: what the README quotes must follow from what was measured."""
from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import bench_attention, bench_w4a16

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def _load(name):
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def _same(a, b):
    assert [r["what"] for r in a] == [r["what"] for r in b]
    for x, y in zip(a, b):
        assert x["target"] == y["target"] and x["met"] == y["met"], x["what"]
        assert math.isclose(x["value"], y["value"], rel_tol=1e-9), x["what"]


@pytest.mark.parametrize("name", ["w4a16_h100.json"])
def test_w4a16_summary_follows_from_its_sums(name):
    results = _load(name)
    _same(bench_w4a16.summary_of(results), results["summary"])
    rows = {r["what"]: r for r in results["summary"]}
    sums = results["sums"]
    m1 = sums["torch.bfloat16 M=1"]
    assert math.isclose(rows["M=1 bf16 four-layer sum / tinygemm"]["value"], m1["tinyq_us"] / m1["tinygemm_us"])
    m256 = sums["torch.float16 M=256"]
    assert math.isclose(rows["M=256 float16 speed vs cuBLAS"]["value"], m256["cublas_us"] / m256["tinyq_us"])
    # every op whose host cost was measured has its eager/graph row, norms and attention included
    for h in results["host_cost"]:
        r = rows[f"eager/graph {h['op']} {h['dtype'][6:]}"]
        assert r["target"] == "<= 1.3" and r["met"] == (h["ratio"] <= 1.3)


def test_attention_summary_follows_from_its_rows():
    results = _load("attention_h100.json")
    _same(bench_attention.summarize(results["rows"]), results["summary"])
