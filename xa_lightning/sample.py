"""The xa-sample task: images from a plain backbone or from a trained method, into the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from xa_lightning.errors import UserError


def read_prompts(cfg: DictConfig) -> list[str]:
    from xa_lightning.metrics.evaluate import read_prompts as read_prompt_file

    if cfg.get("prompts"):
        prompts = [str(p) for p in cfg.prompts]
    elif cfg.get("prompts_file"):
        prompts = read_prompt_file(cfg.prompts_file, "prompts_file")
    else:
        prompts = []
    if not prompts:
        raise UserError("no prompts: set prompts='[a photo of a cat]' or a non-empty prompts_file")
    return (prompts * cfg.num_images)[: cfg.num_images]


def read_references(cfg: DictConfig, count: int):
    """Image i's reference: file ``i % n`` of ``references_dir`` (sorted), float (count, 3, r, r); None unset."""
    if not cfg.get("references_dir"):
        return None
    from xa_lightning.metrics.evaluate import load_references

    references = load_references(cfg.references_dir, count, cfg.reference_resolution, "references_dir")
    return references[[i % len(references) for i in range(count)]]


def save_images(images: np.ndarray, prompts: list[str], seeds: list[int], out_dir: Path, tag: str) -> list[str]:
    """uint8 (B, H, W, 3) -> PNG files + an index (samples.json)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        name = f"{tag}_{i:03d}_seed{seed}.png"
        Image.fromarray(image).save(out_dir / name)
        files.append({"file": name, "prompt": prompt, "seed": seed})
    index = out_dir / "samples.json"
    existing = json.loads(index.read_text()) if index.is_file() else []
    index.write_text(json.dumps(existing + files, indent=2))
    return [f["file"] for f in files]


def sample_backbone(cfg: DictConfig, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """One image per (prompt, seed) through the backbone family's own diffusers pipeline."""
    import torch

    from xa_lightning.backbones import backbone_from_config

    backbone = backbone_from_config(cfg.backbone).to(cfg.device)
    pipe = backbone.pipeline()
    pipe.set_progress_bar_config(disable=False, desc=f"{backbone.id}")
    images = []
    for prompt, seed in zip(prompts, seeds):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = pipe(
            prompt=prompt,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            generator=generator,
            output_type="np",
        )
        images.append((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
    return np.stack(images)


def sample_method(cfg: DictConfig, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, str]:
    """Through the checkpoint's method; its image-prompted samplers (A4A, X-Adapter's ControlNet / T2I /
    IP-Adapter / SDEdit) take one ``references_dir`` image per prompt."""
    from xa_lightning.training import load_method

    module = load_method(cfg.ckpt_path).to(cfg.device)
    samplers = module.evaluation_samplers()
    name = cfg.sampler or next(iter(samplers))
    if name not in samplers:
        raise UserError(f"sampler={name} is not a sampler of {module.method}; choose one of {', '.join(samplers)}")
    images = samplers[name](prompts, seeds, read_references(cfg, len(prompts)))
    return images.permute(0, 2, 3, 1).cpu().numpy(), name


def run(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    prompts = read_prompts(cfg)
    if cfg.get("references_dir") and not cfg.get("ckpt_path"):
        raise UserError("references_dir needs ckpt_path=<a method checkpoint>: a plain backbone takes no image prompt")
    seeds = [cfg.seed + i for i in range(len(prompts))]
    out_dir = Path(HydraConfig.get().runtime.output_dir) / "samples"
    if cfg.get("ckpt_path"):
        images, tag = sample_method(cfg, prompts, seeds)
    else:
        images, tag = sample_backbone(cfg, prompts, seeds), f"{cfg.backbone.family}_{cfg.backbone.flavour}"
    files = save_images(images, prompts, seeds, out_dir, tag)
    print(json.dumps({"out_dir": str(out_dir), "images": len(files), "source": tag}))
    return None
