"""SUN inference: 4-step, CFG-free sampling through any Stable Diffusion pipeline of diffusers.

:class:`SUNPipeline` wraps a ``StableDiffusionPipeline`` (or its img2img / inpaint / ControlNet variants,
or one whose UNet is a different fine-tune of the same architecture): it installs the adapter into the
UNet, switches the scheduler to DPM-Solver++ with trailing spacing, encodes prompt and negative prompt
and hands the pipeline ``prompt_embeds = cat([prompt, negative], tokens)`` with ``guidance_scale=1`` (no
CFG: one UNet call of batch B per step). A ControlNet sees only the prompt tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import nn

from xa_lightning.errors import UserError
from xa_lightning.methods.sun.adapter import SUNAdapter, shield_from_negative_tokens
from xa_lightning.methods.sun.attention import concat_negative
from xa_lightning.methods.sun.teacher import dpm_solver

DEFAULT_STEPS = 4


def load_sun_adapter(source: SUNAdapter | str | Path, unet: nn.Module, num_negative_tokens: int = 77) -> SUNAdapter:
    """A SUN adapter from an object, a ``save_pretrained`` directory (our export) or an official weight file."""
    if isinstance(source, SUNAdapter):
        return source
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} is not a SUN adapter directory (config.json missing); pass the adapter "
                "export of xa-train or the official sun_adapter_*.safetensors file"
            )
        try:
            adapter = SUNAdapter.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as error:
            raise UserError(f"cannot load the SUN adapter in {path} ({error}); re-export it") from error
        return adapter
    from xa_lightning.methods.sun.convert import load_official_adapter

    return load_official_adapter(path, unet, num_negative_tokens=num_negative_tokens)


def _controlnets(pipe: DiffusionPipeline) -> list[nn.Module]:
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return []
    return list(getattr(controlnet, "nets", [controlnet]))


class SUNPipeline:
    """CFG-free few-step sampling with a SUN adapter on top of a diffusers Stable Diffusion pipeline.

    ``SUNPipeline(pipe, adapter)(prompt, negative_prompt=...)`` takes every argument of the wrapped
    pipeline's ``__call__`` (``image``, ``mask_image``, ``strength``, ``generator``, ``output_type``,
    ``cross_attention_kwargs`` ...) except ``guidance_scale``, which must stay <= 1. Attributes not
    defined here (``vae``, ``unet``, ``scheduler``, ``to`` ...) are the wrapped pipeline's.
    """

    def __init__(
        self, pipe: DiffusionPipeline, adapter: SUNAdapter | str | Path, num_inference_steps: int = DEFAULT_STEPS
    ) -> None:
        if not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "unet"):
            raise UserError(f"{type(pipe).__name__} is not a Stable Diffusion pipeline (no unet / encode_prompt)")
        num_tokens = int(getattr(pipe.tokenizer, "model_max_length", 77))
        self.pipe = pipe
        self.adapter = load_sun_adapter(adapter, pipe.unet, num_negative_tokens=num_tokens)
        self.adapter.install(pipe.unet)
        self.adapter.to(pipe.unet.device)
        for controlnet in _controlnets(pipe):
            shield_from_negative_tokens(controlnet, self.adapter.config.num_negative_tokens)
        pipe.scheduler = dpm_solver(pipe.scheduler.config)
        self.num_inference_steps = int(num_inference_steps)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        adapter: SUNAdapter | str | Path,
        pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline,
        unet: nn.Module | None = None,
        **kwargs: Any,
    ) -> SUNPipeline:
        """Load a base model (hub id or local diffusers directory), optionally swap in a fine-tuned ``unet``."""
        kwargs.setdefault("safety_checker", None)
        if unet is not None:
            kwargs["unet"] = unet
        try:
            pipe = pipeline_class.from_pretrained(str(model), **kwargs)
        except (OSError, ValueError) as error:
            raise UserError(
                f"cannot load the base model {model!s} ({type(error).__name__}); pass a local diffusers "
                "directory or a hub id reachable from this machine"
            ) from error
        return cls(pipe, adapter)

    def __getattr__(self, name: str) -> Any:
        pipe = self.__dict__.get("pipe")
        if pipe is None:
            raise AttributeError(name)
        return getattr(pipe, name)

    def to(self, *args: Any, **kwargs: Any) -> SUNPipeline:
        self.pipe.to(*args, **kwargs)
        self.adapter.to(self.pipe.unet.device)
        return self

    def _device(self) -> torch.device:
        unet = self.pipe.unet
        # diffusers' _execution_device walks every submodule (tens of ms); only offloading needs it
        if hasattr(unet, "_hf_hook") or getattr(unet, "_diffusers_hook", None) is not None:
            return self.pipe._execution_device
        return unet.device

    def encode(
        self,
        prompt: Any = None,
        negative_prompt: Any = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        lora_scale: float | None = None,
    ) -> torch.Tensor:
        """``cat([prompt, negative], tokens)``; no negative prompt means the empty prompt, as in CFG."""
        device = self._device()
        if isinstance(prompt, (list, tuple)) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)  # one negative prompt for the whole batch
        positive, negative = self.pipe.encode_prompt(
            prompt,
            device,
            1,
            True,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        if negative.shape[1] != self.adapter.config.num_negative_tokens:
            raise UserError(
                f"negative prompt embeddings have {negative.shape[1]} tokens, the SUN adapter reads "
                f"{self.adapter.config.num_negative_tokens}; pad negative_prompt_embeds to that length"
            )
        return concat_negative(positive, negative)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Any = None,
        negative_prompt: Any = None,
        num_inference_steps: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        **kwargs: Any,
    ) -> Any:
        if guidance_scale is not None and guidance_scale > 1:
            raise UserError(
                f"guidance_scale={guidance_scale}: SUN samples without classifier-free guidance; "
                "leave guidance_scale unset (the negative prompt still applies through SUN)"
            )
        cross_attention_kwargs = kwargs.get("cross_attention_kwargs") or {}
        states = self.encode(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            clip_skip=kwargs.pop("clip_skip", None),
            lora_scale=cross_attention_kwargs.get("scale"),
        )
        device = self._device()  # with model CPU offload: where the UNet will run, not where it waits
        if next(self.adapter.parameters()).device != device:
            self.adapter.to(device)
        if not self.adapter.is_installed(self.pipe.unet):  # e.g. the user replaced pipe.unet
            self.adapter.install(self.pipe.unet)
        return self.pipe(
            prompt_embeds=states,
            guidance_scale=1.0,
            num_inference_steps=num_inference_steps or self.num_inference_steps,
            **kwargs,
        )
