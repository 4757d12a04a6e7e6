"""xa-bench x-adapter: one JSON object as the last line, with the ratios it compares."""

from __future__ import annotations

import json

from xa_lightning.bench import BENCHMARKS
from xa_lightning.methods.x_adapter import bench


def test_bench_reports_training_and_sampling_ratios(capsys):
    assert BENCHMARKS["x-adapter"] == "xa_lightning.methods.x_adapter.bench:main"
    # one timed step and two sampling steps keep the test short; the JSON is what is checked, not the speed
    assert bench.main(["--steps", "1", "--sample-steps", "2", "--batch-size", "1", "--levers", "none"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "x-adapter" and result["device"].startswith("cpu")
    assert result["flavour"] == "tiny" and result["mapper_params_m"] > 0
    times = result["train_step_s"]
    assert result["ratio"] == times["upgraded_forward_backward"] / times["x_adapter"] > 0
    sampling = result["sampling"]
    assert result["sampling_ratio"] == sampling["upgraded_only_s"] / sampling["x_adapter_two_stage_s"] > 0
