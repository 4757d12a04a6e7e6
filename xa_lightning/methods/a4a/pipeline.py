"""A4A inference: the upgraded model's own diffusers pipeline + A4A + the PTA's image encoder.

No base model: the reference image goes through the PTA's CLIP encoder and image projection, the PTA's
per-layer weights and the A4A modules, and the resulting keys / values enter every cross-attention layer of
the upgraded model (SDXL UNet or PixArt-alpha transformer)::

    pipe = A4APipeline(sdxl_pipeline, adapter, image_encoder, pta)
    images = pipe("a portrait, oil painting", ip_adapter_image=face, scale=0.8).images

Every other argument is the wrapped pipeline's (``num_inference_steps``, ``guidance_scale``, ``generator``,
``height`` ...). With classifier-free guidance the unconditional branch gets the "no image" features
(zero embedding for a plain PTA, the encoding of an all-zero input for Plus), as diffusers' IP-Adapter does.
``scale`` is lambda; 0 gives the plain upgraded model bit for bit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from xa_lightning.errors import UserError
from xa_lightning.methods.a4a.attention import ImageInjection
from xa_lightning.methods.a4a.modules import A4AAdapter, image_keys_values, uses_hidden_states
from xa_lightning.plugins.ip_adapter import ImageEncoder, IPAdapterModel, load_image_encoder, read_ip_adapter

ImageInput = Any  # PIL image, numpy HWC uint8, tensor (3,H,W) / (B,3,H,W) in [0, 1], or a list of them


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise UserError(f"{type(pipe).__name__} has no unet or transformer; A4A needs an SDXL or PixArt-alpha pipeline")
    return denoiser


def _one_image(image: ImageInput) -> Tensor:
    if isinstance(image, Tensor):
        tensor = image.float()
        return tensor / 255.0 if image.dtype == torch.uint8 else tensor
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
    return tensor / 255.0 if array.dtype == np.uint8 else tensor


def reference_batch(images: ImageInput, batch_size: int) -> Tensor:
    """Float ``(B, 3, H, W)`` in [0, 1]: one image for every prompt, or one per prompt."""
    if isinstance(images, Tensor) and images.ndim == 4:
        batch = _one_image(images)
    elif isinstance(images, (list, tuple)):
        parts = [_one_image(image) for image in images]
        if len({tuple(p.shape) for p in parts}) > 1:
            raise UserError("ip_adapter_image: images of a list must share one size; resize them first")
        batch = torch.stack(parts)
    else:
        batch = _one_image(images).unsqueeze(0)
    if batch.shape[0] == 1 and batch_size > 1:
        batch = batch.expand(batch_size, -1, -1, -1)
    if batch.shape[0] != batch_size:
        raise UserError(
            f"ip_adapter_image: {batch.shape[0]} images for {batch_size} prompts; give one, or one per prompt"
        )
    return batch


def _batch_size(prompt: Any, kwargs: dict[str, Any]) -> int:
    if isinstance(prompt, str):
        return 1
    if prompt is not None:
        return len(prompt)
    embeds = kwargs.get("prompt_embeds")
    if embeds is None:
        raise UserError("A4APipeline: pass prompt or prompt_embeds")
    return int(embeds.shape[0])


class A4APipeline:
    """Image prompts for an upgraded model through A4A (or the from-scratch IP-Adapter baseline).

    Args:
        pipe: the upgraded model's diffusers pipeline (``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``).
        adapter: an :class:`A4AAdapter` (or an :class:`IPAdapterModel` trained on the upgraded model's layers).
        image_encoder: the PTA's CLIP image encoder (:class:`ImageEncoder`).
        pta: the PTA's frozen weights (:class:`IPAdapterModel`); not needed when the adapter holds a fine-tuned
            PTA, nor for the from-scratch IP-Adapter.
        injection: an :class:`ImageInjection` already installed in ``pipe``'s denoiser (the training module's);
            None installs one.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        adapter: A4AAdapter | IPAdapterModel,
        image_encoder: ImageEncoder,
        pta: IPAdapterModel | None = None,
        injection: ImageInjection | None = None,
    ) -> None:
        denoiser = denoiser_of(pipe)
        if isinstance(adapter, A4AAdapter) and adapter.pta is None and pta is None:
            raise UserError("A4APipeline: the adapter holds no fine-tuned PTA; pass the PTA (pta=IPAdapterModel)")
        self.pipe = pipe
        self.adapter = adapter
        self.image_encoder = image_encoder
        self.pta = pta
        self.injection = (
            injection if injection is not None and injection.denoiser is denoiser else ImageInjection(denoiser)
        )
        if self.adapter_layers() != len(self.injection.layers):
            raise UserError(
                f"the adapter was trained for {self.adapter_layers()} cross-attention layers, "
                f"{type(denoiser).__name__} has {len(self.injection.layers)}; use the adapter of this model"
            )
        self.injection.install()

    def adapter_layers(self) -> int:
        return len(self.adapter.to_k_ip) if isinstance(self.adapter, IPAdapterModel) else self.adapter.num_layers

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        adapter: str | os.PathLike[str],
        image_encoder: str | os.PathLike[str],
        pta_weights: str | os.PathLike[str] | None = None,
        pipeline_class: type[DiffusionPipeline] | None = None,
        **kwargs: Any,
    ) -> A4APipeline:
        """Load everything from disk: the upgraded model (hub id / diffusers dir), an exported adapter directory
        (``<run>/adapter``), the PTA's image encoder directory and, for a frozen PTA, its IP-Adapter file."""
        adapter_dir = Path(adapter)
        config_file = adapter_dir / "config.json"
        if not config_file.is_file():
            raise UserError(f"{adapter_dir} is not an exported A4A adapter (config.json missing); pass <run>/adapter")
        class_name = json.loads(config_file.read_text()).get("_class_name")
        adapter_class = IPAdapterModel if class_name == IPAdapterModel.__name__ else A4AAdapter
        loaded_adapter = adapter_class.from_pretrained(str(adapter_dir))
        pta = None
        if isinstance(loaded_adapter, A4AAdapter) and loaded_adapter.pta is None:
            if pta_weights is None:
                raise UserError("pta_weights is required: the adapter was trained with a frozen PTA; pass its file")
            pta = IPAdapterModel.from_layout(read_ip_adapter(pta_weights, key="pta_weights"))
        try:
            pipe = (pipeline_class or DiffusionPipeline).from_pretrained(str(model), **kwargs)
        except (OSError, ValueError) as error:
            raise UserError(
                f"cannot load the upgraded model {model!s} ({type(error).__name__}); pass a local diffusers "
                "directory or a reachable hub id"
            ) from error
        encoder = load_image_encoder(image_encoder, key="image_encoder")
        return cls(pipe, loaded_adapter, encoder, pta)

    def __getattr__(self, name: str) -> Any:
        pipe = self.__dict__.get("pipe")
        if pipe is None:
            raise AttributeError(name)
        return getattr(pipe, name)

    def to(self, *args: Any, **kwargs: Any) -> A4APipeline:
        self.pipe.to(*args, **kwargs)
        device = denoiser_of(self.pipe).device
        for module in (self.adapter, self.image_encoder, self.pta):
            if module is not None:
                module.to(device)
        return self

    def image_conditions(
        self, images: Tensor, num_images_per_prompt: int = 1
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Keys / values of the references and of "no image", per upgraded layer, repeated per image."""
        hidden = uses_hidden_states(self.adapter, self.pta)
        features = self.image_encoder.features(images, hidden)
        unconditional = self.image_encoder.unconditional(images.shape[0], hidden)
        keys, values = image_keys_values(self.adapter, self.pta, features)
        negative_keys, negative_values = image_keys_values(self.adapter, self.pta, unconditional)

        def repeat(tensors: Sequence[Tensor]) -> list[Tensor]:
            return [t.repeat_interleave(num_images_per_prompt, dim=0) for t in tensors]

        return repeat(keys), repeat(values), repeat(negative_keys), repeat(negative_values)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        ip_adapter_image: ImageInput = None,
        scale: float = 1.0,
        num_images_per_prompt: int = 1,
        **kwargs: Any,
    ) -> Any:
        if ip_adapter_image is None or scale == 0:
            return self.pipe(prompt=prompt, num_images_per_prompt=num_images_per_prompt, **kwargs)
        device = denoiser_of(self.pipe).device
        images = reference_batch(ip_adapter_image, _batch_size(prompt, kwargs)).to(device)
        keys, values, negative_keys, negative_values = self.image_conditions(images, num_images_per_prompt)
        with self.injection.conditioned(keys, values, scale, negative_keys, negative_values):
            return self.pipe(prompt=prompt, num_images_per_prompt=num_images_per_prompt, **kwargs)
