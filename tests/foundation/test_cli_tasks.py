"""The Hydra tasks end to end, in-process: xa-sample writes images; xa-tables reads runs back."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from xa_lightning import cli, tables


def test_sample_writes_images_from_the_tiny_backbone_pipeline(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.sample_main(
        [
            "backbone=sd15_tiny",
            "num_images=2",
            "num_inference_steps=2",
            "prompts=[a red fox in the snow,a lighthouse at night]",
            f"hydra.run.dir={out}",
        ]
    )
    assert code == 0
    index = json.loads((out / "samples" / "samples.json").read_text())
    assert [e["prompt"] for e in index] == ["a red fox in the snow", "a lighthouse at night"]
    images = [np.asarray(Image.open(out / "samples" / e["file"])) for e in index]
    assert images[0].shape == (64, 64, 3)
    assert not np.array_equal(images[0], images[1]), "different prompts and seeds gave the same image"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 2
    assert (out / ".hydra" / "config.yaml").is_file()


def test_tables_collects_final_metrics_per_run_and_sampler(tmp_path, capsys):
    for seed, fid in ((0, 10.0), (1, 12.0)):
        run = tmp_path / f"run{seed}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"run_name: demo_sun\nseed: {seed}\n")
        (run / "metrics.json").write_text(
            json.dumps({"metrics": {"eval/sun/fid": fid, "eval/teacher/fid": fid + 1, "eval/sun_vs_teacher/fid": 3.0}})
        )
    rows = tables.collect([str(tmp_path)])
    assert {(r["run"], r["sampler"]) for r in rows} == {
        (f"demo_sun (seed {s})", name) for s in (0, 1) for name in ("sun", "teacher", "sun_vs_teacher")
    }
    assert next(r for r in rows if r["run"] == "demo_sun (seed 1)" and r["sampler"] == "teacher")["fid"] == 13.0
    assert cli.tables_main([str(tmp_path), "--out", str(tmp_path / "t.md")]) == 0
    assert "| demo_sun (seed 0) | sun | 10 |" in (tmp_path / "t.md").read_text()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
