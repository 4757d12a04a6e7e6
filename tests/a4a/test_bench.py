"""xa-bench a4a runs in one process and reports both comparisons as the last JSON line (no timing asserted)."""

from __future__ import annotations

import json

from xa_lightning.bench import BENCHMARKS, main


def test_bench_reports_inference_and_training_ratios(capsys):
    assert BENCHMARKS["a4a"] == "xa_lightning.methods.a4a.bench:main"
    assert main(["a4a", "--steps", "1", "--repeats", "1", "--levers", "none"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "a4a" and result["device"] and result["flavour"] == "tiny"
    for part in ("inference", "training"):
        assert result[part]["ratio"] > 0
    assert result["ratio"] == result["inference"]["ratio"] and result["adapter_params_m"] > 0
