"""`make demo`: the most complete real path that exists, on the CPU, in minutes, and a page a person can read.

One line per stage while it runs:

1. sample the tiny backbones of all three families through their real diffusers pipelines;
2. for every ``experiments/demo/<name>.yaml`` (each method's demo, then variants such as ``a4a_pixart``):
   ``xa-train experiment=demo/<name>`` in its own process, exactly as a user types it (its output goes to
   ``<name>/stdout.log``): training on the demo data (written on first use in the datasets' real
   on-disk formats), evaluation, export;
3. per method, from its checkpoint: an image grid (rows = samplers, columns = prompts) and the loss curve;
4. the tiny version of every paper table from these runs (``xa-tables --table all --scale tiny``);
5. ``results.md`` linking all of it.

Everything lands under ``outputs/demo/<date>_<time>/``. Tiny models have random weights: the numbers and
images show that every code path runs, not what the methods achieve.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xa_lightning.config import compose
from xa_lightning.methods import METHODS
from xa_lightning.paths import repo_root

DEMO_BACKBONES = ("sd15_tiny", "sdxl_tiny", "pixart_alpha_tiny")
GRID_PROMPTS = 4
STAGES = 5


def stage(number: int, text: str) -> None:
    print(f"[demo {number}/{STAGES}] {text}", flush=True)


@contextlib.contextmanager
def chatter_to(log_file: Path) -> Iterator[None]:
    """Progress bars and library notices of an in-process stage go to ``log_file``: one line per stage here."""
    from diffusers.utils import logging as diffusers_logging

    log_file.parent.mkdir(parents=True, exist_ok=True)
    verbosity = diffusers_logging.get_verbosity()
    with log_file.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        diffusers_logging.set_verbosity_error()  # its handler holds the real stderr; notices only
        try:
            yield
        finally:
            diffusers_logging.set_verbosity(verbosity)


def sample_tiny_backbones(out_dir: Path) -> dict[str, list[str]]:
    from xa_lightning.sample import read_prompts, sample_backbone, save_images

    files = {}
    for name in DEMO_BACKBONES:
        cfg = compose("sample", [f"backbone={name}", "num_images=2", "num_inference_steps=10"])
        prompts = read_prompts(cfg)
        seeds = [cfg.seed + i for i in range(len(prompts))]
        images = sample_backbone(cfg, prompts, seeds)
        files[name] = save_images(images, prompts, seeds, out_dir / "samples", name)
    return files


def demo_methods() -> list[str]:
    """Every ``experiments/demo/*.yaml``, each registered method's own demo first (``sun``, ``x_adapter``,
    ``a4a``), then the variants that fill more cells of the tiny tables (``a4a_pixart``, ``x_adapter_ip``)."""
    experiments = repo_root() / "experiments" / "demo"
    names = sorted(path.stem for path in experiments.glob("*.yaml"))
    return [name for name in METHODS if name in names] + [name for name in names if name not in METHODS]


def train(method: str, run_dir: Path) -> tuple[int, float]:
    """``xa-train experiment=demo/<method>`` in a new process; (exit code, seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "xa_lightning.cli",
        "train",
        f"experiment=demo/{method}",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.monotonic()
    with (run_dir / "stdout.log").open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    return code, time.monotonic() - start


def sampler_images(run_dir: Path, count: int = GRID_PROMPTS) -> tuple[dict[str, Any], list[str], list[int]]:
    """Every sampler of the trained method on the run's first ``count`` evaluation prompts (and references)."""
    import torch
    from omegaconf import OmegaConf

    from xa_lightning.config import instantiate
    from xa_lightning.metrics.config import EvaluationConfig
    from xa_lightning.metrics.evaluate import build_evaluation_set
    from xa_lightning.training import load_method

    module = load_method(run_dir / "checkpoints" / "last.ckpt")
    config = module.run_config or {}
    evaluation = EvaluationConfig.coerce({**config["eval"], "num_images": count, "images_per_reference": 1})
    datamodule = instantiate(OmegaConf.create(config["data"]))
    datamodule.prepare_data()
    datamodule.setup("fit")
    eval_set = build_evaluation_set(evaluation, datamodule)
    prompts, seeds, references = eval_set["prompts"], eval_set["seeds"], eval_set["references"]
    rows: dict[str, Any] = {}
    if references is not None:
        rows["reference"] = (references.clamp(0, 1) * 255).round().to(torch.uint8)
    with torch.no_grad():
        for name, sampler in module.evaluation_samplers().items():
            rows[name] = sampler(prompts, seeds, references).cpu()
    return rows, prompts, seeds


def method_figures(method: str, run_dir: Path) -> dict[str, str]:
    """``grid.png`` (rows = samplers, columns = prompts) and ``loss.png`` of a finished demo run."""
    from xa_lightning.reporting import plots

    figures = {}
    rows, prompts, seeds = sampler_images(run_dir)
    title = f"{method}: every sampler on the same prompts and seeds (tiny models, random weights)"
    figures["grid"] = str(plots.labelled_grid(rows, prompts, run_dir / "grid.png", title, seeds))
    if plots.loss_curve(run_dir / "csv" / "metrics.csv", run_dir / "loss.png", f"{method}: training loss"):
        figures["loss"] = str(run_dir / "loss.png")
    return figures


def _link(path: str | Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def results_page(
    out_root: Path,
    samples: dict[str, list[str]],
    runs: dict[str, dict[str, Any]],
    tables: list[dict[str, Any]],
) -> str:
    from xa_lightning.tables import collect, markdown

    lines = [
        f"# make demo — {out_root.name}",
        "",
        "Every image and number here comes from **tiny models with random weights**, trained for a few steps",
        "on the demo data on the CPU. They show that each method's real code path runs end to end (training,",
        "sampling, evaluation, export), not what the methods achieve; the paper-scale commands are in",
        "docs/reproducing.md.",
        "",
        "## Tiny backbones",
        "",
        "Images from each family's own diffusers pipeline:",
        "",
    ]
    for name, files in samples.items():
        lines.append(f"- {name}: " + " ".join(f"![{name}](samples/{f})" for f in files))
    for method, run in runs.items():
        lines += ["", f"## {method} — `xa-train experiment=demo/{method}`", ""]
        status = "ok" if run["code"] == 0 else f"**failed** (exit {run['code']})"
        lines.append(
            f"{status} in {run['seconds']:.0f} s · run directory [{method}/]({method}/) · "
            f"output [{method}/stdout.log]({method}/stdout.log)"
        )
        for kind, path in run.get("figures", {}).items():
            lines += ["", f"![{method} {kind}]({_link(path, out_root)})"]
        if run.get("figure_error"):
            lines += ["", f"(no figures: {run['figure_error']})"]
    lines += ["", "## The papers' tables, tiny version", ""]
    lines.append(
        "Built by `xa-tables --table all --scale tiny` from the runs above; cells other runs fill show why not."
    )
    lines.append("")
    for summary in tables:
        files = summary["files"]
        cells = ", ".join(f"{n} {status}" for status, n in summary["cells"].items())
        extra = " · ".join(f"[{kind}]({_link(path, out_root)})" for kind, path in files.items() if kind != "markdown")
        lines.append(f"- [{summary['table']}]({_link(files['markdown'], out_root)}): {cells} · {extra}")
    lines += ["", "## Every run's final metrics", "", markdown(collect([str(out_root)]))]
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch

    # Tiny models are dominated by per-op overhead: one intra-op thread is as fast as many and does not
    # collapse when other processes share the cores (measured 10x on 2-core machines).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    out_root = Path("outputs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"[demo] writing to {out_root}", flush=True)

    start = time.monotonic()
    with chatter_to(out_root / "samples" / "sample.log"):
        samples = sample_tiny_backbones(out_root)
    stage(1, f"sampled the tiny backbones ({', '.join(samples)}) in {time.monotonic() - start:.0f} s")

    runs: dict[str, dict[str, Any]] = {}
    for method in demo_methods():
        stage(2, f"xa-train experiment=demo/{method} (output: {out_root / method / 'stdout.log'}) ...")
        code, seconds = train(method, out_root / method)
        runs[method] = {"code": code, "seconds": seconds}
        if code == 0:
            stage(2, f"demo/{method}: trained, evaluated, exported in {seconds:.0f} s")
        else:
            tail = (out_root / method / "stdout.log").read_text(errors="replace").splitlines()[-15:]
            stage(2, f"demo/{method}: FAILED (exit {code}) after {seconds:.0f} s; last lines:")
            print("\n".join("    " + line for line in tail), flush=True)

    for method, run in runs.items():
        if run["code"] != 0:
            continue
        start = time.monotonic()
        try:
            with chatter_to(out_root / method / "figures.log"):
                run["figures"] = method_figures(method, out_root / method)
        except Exception as exc:  # a figure must not hide the run's results; the page says what went wrong
            run["figure_error"] = f"{type(exc).__name__}: {exc}"
        done = ", ".join(_link(p, out_root) for p in run.get("figures", {}).values()) or run.get("figure_error")
        stage(3, f"{method}: {done} ({time.monotonic() - start:.0f} s)")

    from xa_lightning.tables import build_tables

    tables = build_tables(["all"], [out_root], out_root / "tables", scale="tiny")
    filled = sum(s["cells"].get("ok", 0) for s in tables)
    stage(4, f"tiny paper tables: {len(tables)} tables, {filled} cells filled, in {out_root / 'tables'}")

    page = out_root / "results.md"
    page.write_text(results_page(out_root, samples, runs, tables), encoding="utf-8")
    stage(5, f"open {page}")
    failures = [m for m, r in runs.items() if r["code"] != 0]
    summary = {"demo_dir": str(out_root), "results": str(page), "methods": list(runs), "failed": failures}
    print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
