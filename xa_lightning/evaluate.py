"""Evaluation without training: ``xa-eval ckpt_path=...`` and ``xa-train train=false``.

Both rebuild the method, generate with every sampler on the evaluation set and score it through the same
function the evaluation callback uses, then write ``metrics.json`` (read by ``xa-tables``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xa_lightning.config import instantiate


def evaluate_module(
    module: Any,
    eval_cfg: DictConfig,
    data_cfg: DictConfig | None,
    out_dir: Path,
    device: str = "cpu",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import torch

    from xa_lightning.metrics.config import EvaluationConfig
    from xa_lightning.metrics.evaluate import build_evaluation_set, evaluate_samplers, prepare_evaluation

    module = module.to(device).eval()
    config = EvaluationConfig.coerce(OmegaConf.to_container(eval_cfg, resolve=True))
    datamodule = None
    if data_cfg:
        datamodule = instantiate(data_cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
    prepare_evaluation(config, datamodule, device)  # weights and sources, before anything is generated
    eval_set = build_evaluation_set(config, datamodule)
    with torch.no_grad():
        result = evaluate_samplers(
            module.evaluation_samplers(),
            eval_set["prompts"],
            eval_set["seeds"],
            eval_set["references"],
            eval_set["real_images"],
            config,
            device=torch.device(device),
            log_images=0,
        )
    summary = {
        **(extra or {}),
        "method": module.method,
        "samples_seen": module.samples_seen,
        "metrics": {f"eval/{k}": v for k, v in result["metrics"].items()},
        "prompts": eval_set["prompts"],
        "seeds": eval_set["seeds"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from xa_lightning.training import load_method

    module = load_method(cfg.ckpt_path)
    summary = evaluate_module(
        module,
        cfg.eval,
        cfg.get("data"),
        Path(HydraConfig.get().runtime.output_dir),
        device=cfg.device,
        extra={"checkpoint": str(cfg.ckpt_path)},
    )
    print(json.dumps({k: v for k, v in summary.items() if k not in ("prompts", "seeds")}))
    return None
