"""xa-bench's shared parts: levers switched on and off from one base, ``xa-bench all``'s summary (no timing asserted;
speed targets are the benchmarks' own business)."""

from __future__ import annotations

import json

import pytest

from xa_lightning.bench import main
from xa_lightning.benchmarking import compare_levers, parse_levers
from xa_lightning.errors import UserError


def test_each_lever_is_measured_on_and_off_from_the_base_and_each_setting_once():
    calls = []

    def measure(settings):
        calls.append(dict(settings))
        step = 1.0 if settings["attention"] == "sdpa" else 1.5  # the fused attention is faster here
        return {"step_s": step, "peak_mib": 8.0 if settings["gradient_checkpointing"] else 32.0}

    base = {"dtype": "fp32", "attention": "sdpa", "channels_last": False, "gradient_checkpointing": False}
    table = compare_levers(measure, base, ["sdpa", "gradient_checkpointing"])

    assert len(calls) == 3 and calls[0] == base  # base (sdpa on, checkpointing off) measured once
    assert table["base"] == measure(base)
    assert table["levers"]["sdpa"]["off"]["step_s"] == 1.5
    assert table["levers"]["sdpa"]["effect"] == {"step_s": 1.5, "peak_mib": 1.0}
    assert table["levers"]["gradient_checkpointing"]["effect"]["peak_mib"] == 4.0


def test_lever_names_are_checked():
    assert parse_levers("default", "cpu") == ["bf16", "sdpa", "channels_last", "gradient_checkpointing"]
    assert parse_levers("default", "cuda")[-1] == "compile"
    assert parse_levers("none", "cpu") == []
    with pytest.raises(UserError, match=r"--levers: unknown lever 'flash'; choose from bf16, sdpa"):
        parse_levers("sdpa,flash", "cpu")


def test_a4a_gradient_checkpointing_lever_lowers_the_step_peak(capsys):
    assert main(["a4a", "--steps", "1", "--repeats", "1", "--warmup", "0", "--levers", "gradient_checkpointing"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lever = result["levers"]["gradient_checkpointing"]
    assert lever["off"]["a4a_s_per_image"] == result["inference"]["a4a_s_per_image"]  # off is the base: reused
    # the peak is the profiler's count of tensor allocations: deterministic, unlike the times
    assert lever["effect"]["a4a_step_peak_mib"] > 1.5 and lever["effect"]["upgraded_step_peak_mib"] > 1.5
    assert result["training"]["ratio"] > 0 and result["memory_ratio"] > 0 and "meets_target" in result


def test_all_runs_the_chosen_benchmarks_into_one_summary(capsys):
    assert main(["all", "--only", "backbone"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "all" and summary["failed"] == []
    assert set(summary["results"]["backbone"]["families"]) == {"sd15", "sdxl", "pixart_alpha"}
    assert json.loads(lines[-2]) == summary["results"]["backbone"]  # each benchmark's own line is shown too
    with pytest.raises(UserError, match="unknown benchmark 'nope'"):
        main(["all", "--only", "nope"])


def test_sun_times_the_denoising_loop_apart_from_text_encoding_and_decoding(capsys):
    from xa_lightning.methods.sun import bench

    args = ["--runs", "tiny@cpu", "--repeats", "1", "--warmup", "0", "--teacher-steps", "3", "--student-steps", "2"]
    assert bench.main([*args, "--resolution", "128"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = result["runs"]
    assert run["resolution"] == result["resolution"] == 128
    assert 0 < run["teacher_denoise_s_per_image"] < run["teacher_s_per_image"]
    assert 0 < run["sun_denoise_s_per_image"] < run["sun_s_per_image"]
    assert result["denoise_ratio"] == run["teacher_denoise_s_per_image"] / run["sun_denoise_s_per_image"]
    assert result["adapter_overhead"] == run["sun_denoise_s_per_image"] / run["bare_unet_denoise_s_per_image"]
    assert result["bound"] == 3.0 and result["meets_target"] == (result["denoise_ratio"] >= result["target"])


def test_x_adapter_measures_reduced_resolutions_and_its_levers(capsys):
    from xa_lightning.methods.x_adapter import bench

    args = ["--steps", "1", "--warmup", "0", "--sample-steps", "0", "--batch-size", "1", "--resolution", "256"]
    assert bench.main([*args, "--levers", "gradient_checkpointing"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["resolution"], result["base_resolution"]) == (256, 128) and "sampling" not in result
    lever = result["levers"]["gradient_checkpointing"]
    assert lever["on"]["upgraded_forward_backward_peak_mib"] < lever["off"]["upgraded_forward_backward_peak_mib"]
    assert result["ratio"] == result["train_step_s"]["upgraded_forward_backward"] / result["train_step_s"]["x_adapter"]
