"""xa-bench sun: one JSON object as the last line, counting the UNet evaluations it compares."""

from __future__ import annotations

import json

from xa_lightning.bench import BENCHMARKS
from xa_lightning.methods.sun import bench


def test_bench_reports_unet_evaluations_and_ratio(capsys):
    assert BENCHMARKS["sun"] == "xa_lightning.methods.sun.bench:main"
    # few steps keep the test short; the counting and the JSON are what is checked, not the speed
    assert (
        bench.main(
            ["--runs", "tiny@cpu", "--repeats", "1", "--warmup", "0", "--teacher-steps", "5", "--student-steps", "2"]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["benchmark"] == "sun" and result["device"].startswith("cpu")
    assert result["teacher_unet_evals_per_image"] == 10 and result["sun_unet_evals_per_image"] == 2
    assert result["bound"] == 5.0 and result["target"] == 10.0
    assert result["ratio"] == result["teacher_s_per_image"] / result["sun_s_per_image"] > 0


def test_train_bench_reports_peak_memory_with_and_without_checkpointed_student_steps(capsys):
    args = ["--train", "--runs", "tiny@cpu", "--repeats", "1", "--teacher-substeps", "1", "--student-steps", "2"]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "sun" and result["mode"] == "train" and result["device"].startswith("cpu")
    assert result["same_gradients"] is True
    peaks = result["peak_mb"]
    # one student step's activations instead of both: measured 5.7 MB -> 2.9 MB on the tiny UNet
    assert result["ratio"] == peaks["single_backward"] / peaks["checkpointed"] > 1.5
