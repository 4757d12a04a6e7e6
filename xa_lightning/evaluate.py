"""The xa-eval checkpoint task: rebuild the method, generate with every sampler, score, write metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf


def run(cfg: DictConfig) -> Optional[float]:
    import torch
    from hydra.core.hydra_config import HydraConfig
    from xa_lightning.config import instantiate

    from xa_lightning.metrics.config import EvaluationConfig
    from xa_lightning.metrics.evaluate import build_evaluation_set, evaluate_samplers
    from xa_lightning.training import load_method

    module = load_method(cfg.ckpt_path).to(cfg.device)
    eval_cfg = EvaluationConfig.coerce(OmegaConf.to_container(cfg.eval, resolve=True))
    datamodule = None
    if cfg.get("data"):
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
    eval_set = build_evaluation_set(eval_cfg, datamodule)
    with torch.no_grad():
        result = evaluate_samplers(module.evaluation_samplers(), eval_set["prompts"], eval_set["seeds"],
                                   eval_set["references"], eval_set["real_images"], eval_cfg,
                                   device=torch.device(cfg.device), log_images=0)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = {"checkpoint": str(cfg.ckpt_path), "method": module.method,
               "samples_seen": module.samples_seen, "metrics": {f"eval/{k}": v for k, v in result["metrics"].items()}}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return None
