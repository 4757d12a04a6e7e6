"""xa-bench data: one JSON object as the last line, with the loader, cache and training-step figures."""

from __future__ import annotations

import json

from xa_lightning.data.bench import main


def test_bench_reports_loader_cache_and_step(capsys):
    main(["--workers", "0", "--batches", "2", "--batch-size", "2", "--resolution", "32", "--threads", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "data" and result["device"].startswith("cpu")
    loader = result["laion"]["0"]
    assert loader["samples"] == 4 and loader["samples_per_s"] > 0  # 2 timed batches of 2 after the first
    assert result["laion_samples_per_s_per_worker"] == loader["samples_per_s_per_worker"]
    assert result["cache"]["samples"] > 0 and result["cache_samples_per_s"] > 0
    assert result["train_step_s"] > 0 and result["train_samples_per_s"] == 2 / result["train_step_s"]
    assert result["data_keeps_up"] == (loader["samples_per_s"] >= result["train_samples_per_s"])
