"""IP-Adapter as a plugin: its published files, diffusers' own loading, and the pieces other methods reuse.

Published layout (tencent-ailab/IP-Adapter, h94/IP-Adapter on the Hub), one file per model:

* ``image_proj.*``: the image projection. Plain IP-Adapter: ``proj.weight`` / ``proj.bias`` (CLIP image
  embedding -> 4 tokens) and ``norm.*``; IP-Adapter-Plus: a perceiver resampler (``latents``, ``proj_in``,
  ``layers.<i>.0.{norm1,norm2,to_q,to_kv,to_out}``, ``layers.<i>.1.{0,1,3}``, ``proj_out``, ``norm_out``)
  reading the CLIP encoder's penultimate hidden states, 16 tokens.
* ``ip_adapter.<2i+1>.to_k_ip.weight`` / ``to_v_ip.weight``: the key / value projections of the image tokens
  for the i-th cross-attention layer of the UNet, numbered by position in ``unet.attn_processors`` (self- and
  cross-attention alternate, hence the odd numbers). SD1.5: 16 layers (1..31), SDXL: 70 layers (1..139).

``.bin`` files nest the two parts (``{"image_proj": {...}, "ip_adapter": {...}}``); ``.safetensors`` files
keep the flat prefixed keys. Both are read through :mod:`xa_lightning.weights` (nothing pickled is executed).

What this module offers:

* :func:`read_ip_adapter` / :func:`save_ip_adapter`: published files <-> :class:`IPAdapterLayout`.
* :func:`load_into_unet`: the IP-Adapter in a diffusers UNet through diffusers' own loader
  (``UNet2DConditionLoadersMixin._load_ip_adapter_weights``: ``IPAdapterAttnProcessor2_0`` in every
  cross-attention layer, ``MultiIPAdapterImageProjection`` as ``encoder_hid_proj``), reversibly: the returned
  :class:`~xa_lightning.backbones.surgery.Surgery` puts the UNet back bit for bit.
* :class:`IPAdapterModel`: the trainable part as a diffusers model (image projection built by diffusers'
  converter + per-layer ``to_k_ip`` / ``to_v_ip`` in the UNet's cross-attention order), for methods that use
  the weights themselves (A4A applies them to the image tokens directly) or train one from scratch.
* :class:`ImageEncoder`: the CLIP vision encoder (``CLIPVisionModelWithProjection``) with its preprocessing
  on tensors; :func:`load_image_encoder` (a local directory / hub id) and :func:`tiny_image_encoder`.
* :func:`random_ip_adapter` / :func:`write_random_ip_adapter`: random, seeded IP-Adapters shaped for a given UNet
  (tiny ones for tests and demos), :func:`tiny_image_encoder` / :func:`random_image_encoder` their encoders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.unet import UNet2DConditionLoadersMixin
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from xa_lightning.backbones.surgery import Surgery, attention_layers
from xa_lightning.errors import UserError
from xa_lightning.weights import SAFETENSORS_SUFFIX, read_state_dict

KINDS = ("plain", "plus")
# Tokens per image: diffusers' loader reads every plain IP-Adapter as 4 tokens; Plus keeps its latents' count.
PLAIN_TOKENS = 4
PLUS_TOKENS = 16
# diffusers' converter derives the resampler's heads as to_q rows / 64.
RESAMPLER_HEAD_DIM = 64
RESAMPLER_DEPTH = 4

_LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")


def ip_adapter_key(index: int) -> int:
    """The published number of the ``index``-th cross-attention layer (``ip_adapter.<n>.to_k_ip.weight``)."""
    return 2 * index + 1


# ------------------------------------------------------------------------------------------ published layout
@dataclass
class IPAdapterLayout:
    """An IP-Adapter in its published layout: ``image_proj`` (published key names, no prefix) and the per-layer
    ``to_k_ip`` / ``to_v_ip`` weights ``(layer_dim, cross_attention_dim)`` in cross-attention order."""

    image_proj: dict[str, Tensor]
    to_k_ip: list[Tensor]
    to_v_ip: list[Tensor]
    source: str = "<memory>"

    @property
    def kind(self) -> str:
        return "plus" if "latents" in self.image_proj else "plain"

    @property
    def cross_attention_dim(self) -> int:
        """Width of the image tokens (= the text context width of the UNet it was trained for: SD1.5 768)."""
        if self.kind == "plus":
            return int(self.image_proj["proj_out.weight"].shape[0])
        return int(self.image_proj["norm.weight"].shape[0])

    @property
    def num_tokens(self) -> int:
        if self.kind == "plus":
            return int(self.image_proj["latents"].shape[1])
        return int(self.image_proj["proj.weight"].shape[0]) // self.cross_attention_dim

    @property
    def image_embed_dim(self) -> int:
        """What the projection reads: CLIP's projected embedding (plain) or its hidden size (plus)."""
        key = "proj_in.weight" if self.kind == "plus" else "proj.weight"
        return int(self.image_proj[key].shape[1])

    @property
    def layer_dims(self) -> list[int]:
        return [int(weight.shape[0]) for weight in self.to_k_ip]

    @property
    def num_layers(self) -> int:
        return len(self.to_k_ip)

    def nested(self) -> dict[str, dict[str, Tensor]]:
        """The ``.bin`` layout, also what diffusers' ``_load_ip_adapter_weights`` takes."""
        layers: dict[str, Tensor] = {}
        for index, (key, value) in enumerate(zip(self.to_k_ip, self.to_v_ip, strict=True)):
            layers[f"{ip_adapter_key(index)}.to_k_ip.weight"] = key
            layers[f"{ip_adapter_key(index)}.to_v_ip.weight"] = value
        return {"image_proj": dict(self.image_proj), "ip_adapter": layers}

    def flat(self) -> dict[str, Tensor]:
        """The ``.safetensors`` layout: ``image_proj.<name>`` and ``ip_adapter.<n>.to_{k,v}_ip.weight``."""
        return {f"{part}.{key}": value for part, values in self.nested().items() for key, value in values.items()}


def parse_ip_adapter(state: Mapping[str, Any], source: str = "<memory>") -> IPAdapterLayout:
    """An :class:`IPAdapterLayout` from a nested (``.bin``) or flat (``.safetensors``) state dict."""
    if "image_proj" in state and "ip_adapter" in state and isinstance(state["image_proj"], Mapping):
        image_proj, layers = dict(state["image_proj"]), dict(state["ip_adapter"])
    else:
        image_proj = {k[len("image_proj.") :]: v for k, v in state.items() if k.startswith("image_proj.")}
        layers = {k[len("ip_adapter.") :]: v for k, v in state.items() if k.startswith("ip_adapter.")}
    if not image_proj or not layers:
        raise UserError(
            f"IP-Adapter {source} has no image_proj.* / ip_adapter.* weights; pass a published IP-Adapter file "
            "(e.g. ip-adapter_sd15.bin or .safetensors)"
        )
    if "latents" not in image_proj and "proj.weight" not in image_proj:
        raise UserError(
            f"IP-Adapter {source}: unsupported image projection (keys {sorted(image_proj)[:3]}...); "
            "supported: the plain IP-Adapter (proj.weight) and IP-Adapter-Plus (resampler latents)"
        )
    keys: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}
    for name, tensor in layers.items():
        match = _LAYER_KEY.match(name)
        if match is None:
            raise UserError(f"IP-Adapter {source}: unexpected key ip_adapter.{name}; is this a plain IP-Adapter file?")
        (keys if match.group(2) == "k" else values)[int(match.group(1))] = tensor
    count = len(keys)
    expected = [ip_adapter_key(i) for i in range(count)]
    if sorted(keys) != expected or sorted(values) != expected:
        raise UserError(
            f"IP-Adapter {source}: layers are numbered {sorted(keys)[:4]}..., expected 1, 3, 5, ... with to_k_ip "
            "and to_v_ip each; the file is incomplete or not an IP-Adapter"
        )
    layout = IPAdapterLayout(
        image_proj=image_proj,
        to_k_ip=[keys[n] for n in expected],
        to_v_ip=[values[n] for n in expected],
        source=source,
    )
    if layout.kind == "plain" and layout.num_tokens != PLAIN_TOKENS:
        raise UserError(
            f"IP-Adapter {source}: a plain IP-Adapter with {layout.num_tokens} tokens; diffusers (and every "
            f"published plain IP-Adapter) uses {PLAIN_TOKENS}"
        )
    return layout


def read_ip_adapter(path: str | os.PathLike[str], key: str = "IP-Adapter") -> IPAdapterLayout:
    """Read a published IP-Adapter file (``.bin`` nested / ``.safetensors`` flat); ``key`` names it in errors."""
    state = read_state_dict(path, key, "point it to an IP-Adapter file such as ip-adapter_sd15.bin")
    return parse_ip_adapter(state, f"{key}={path}")


def save_ip_adapter(layout: IPAdapterLayout, path: str | os.PathLike[str]) -> Path:
    """Write the published layout: flat keys for ``.safetensors``, the nested dict otherwise (``.bin``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in layout.flat().items()}, str(path))
    else:
        nested = {part: {k: v.detach().cpu() for k, v in values.items()} for part, values in layout.nested().items()}
        torch.save(nested, path)
    return path


# ---------------------------------------------------------------------------------- the weights as a model
def _diffusers_image_projection(image_proj: Mapping[str, Tensor]) -> nn.Module:
    """The image projection built and filled by diffusers' own converter (published names -> diffusers modules).

    The converter is a UNet method but reads nothing from the UNet unless ``low_cpu_mem_usage``; calling it
    unbound keeps A4A from building an SD1.5 UNet just to read its PTA.
    """
    return UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, dict(image_proj), low_cpu_mem_usage=False
    )


# A resampler block's parameters: diffusers' name -> the published one (to_k / to_v are published as one to_kv).
_RESAMPLER_PUBLISHED_NAMES = {
    "ln0.weight": "0.norm1.weight",
    "ln0.bias": "0.norm1.bias",
    "ln1.weight": "0.norm2.weight",
    "ln1.bias": "0.norm2.bias",
    "attn.to_q.weight": "0.to_q.weight",
    "attn.to_out.0.weight": "0.to_out.weight",
    "ff.0.weight": "1.0.weight",
    "ff.0.bias": "1.0.bias",
    "ff.1.net.0.proj.weight": "1.1.weight",
    "ff.1.net.2.weight": "1.3.weight",
}


def _published_image_proj(kind: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' image-projection names -> the published ones (the inverse of diffusers' converter)."""
    if kind == "plain":
        return {name.replace("image_embeds.", "proj.", 1): value for name, value in state.items()}
    published: dict[str, Tensor] = {}
    for name, value in state.items():
        match = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if match is None:  # latents, proj_in, proj_out, norm_out keep their names
            published[name] = value
            continue
        layer, rest = match.groups()
        if rest in ("attn.to_k.weight", "attn.to_v.weight"):
            continue  # published as one to_kv below
        published[f"layers.{layer}.{_RESAMPLER_PUBLISHED_NAMES[rest]}"] = value
        if rest == "attn.to_q.weight":
            published[f"layers.{layer}.0.to_kv.weight"] = torch.cat(
                [state[f"layers.{layer}.attn.to_k.weight"], state[f"layers.{layer}.attn.to_v.weight"]], dim=0
            )
    return published


class IPAdapterModel(ModelMixin, ConfigMixin):
    """The trainable part of an IP-Adapter: image projection + per-layer ``to_k_ip`` / ``to_v_ip``.

    ``tokens(features)`` turns CLIP features (plain: the projected image embedding ``(B, E)``; plus: the
    penultimate hidden states ``(B, S, E)``) into ``num_tokens`` image tokens of width ``cross_attention_dim``;
    ``layer_keys_values(tokens)`` applies every layer's weights: the keys and values the i-th cross-attention
    layer attends to. Layers are in the UNet's cross-attention order (``attention_layers(unet, "cross")``).

    Args:
        kind: ``"plain"`` (``ImageProjection``, 4 tokens) or ``"plus"`` (``IPAdapterPlusImageProjection``).
        image_embed_dim: CLIP embedding size (plain) or hidden size (plus) read by the projection.
        cross_attention_dim: width of the image tokens (the UNet's text-context width).
        layer_dims: output width of each layer's ``to_k_ip`` / ``to_v_ip`` (its attention's inner dim).
        num_tokens: image tokens (plain: 4).
        resampler_dim / resampler_heads: the Plus resampler's width and heads (64 channels each).
    """

    @register_to_config
    def __init__(
        self,
        kind: str = "plain",
        image_embed_dim: int = 1024,
        cross_attention_dim: int = 768,
        layer_dims: Sequence[int] = (),
        num_tokens: int = PLAIN_TOKENS,
        resampler_dim: int = 768,
        resampler_heads: int = 12,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise UserError(f"IP-Adapter kind {kind!r} is not one of {KINDS}")
        if kind == "plain":
            if num_tokens != PLAIN_TOKENS:
                raise UserError(
                    f"a plain IP-Adapter has {PLAIN_TOKENS} image tokens (diffusers' layout), not {num_tokens}"
                )
            self.image_projection = ImageProjection(
                image_embed_dim=image_embed_dim,
                cross_attention_dim=cross_attention_dim,
                num_image_text_embeds=num_tokens,
            )
        else:
            self.image_projection = IPAdapterPlusImageProjection(
                embed_dims=image_embed_dim,
                output_dims=cross_attention_dim,
                hidden_dims=resampler_dim,
                depth=RESAMPLER_DEPTH,
                dim_head=RESAMPLER_HEAD_DIM,
                heads=resampler_heads,
                num_queries=num_tokens,
            )
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_attention_dim, int(d), bias=False) for d in layer_dims)
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_attention_dim, int(d), bias=False) for d in layer_dims)

    def public_config(self) -> dict[str, Any]:
        """The constructor's arguments (``IPAdapterModel(**model.public_config())`` builds the same shape)."""
        return {key: value for key, value in self.config.items() if not key.startswith("_")}

    @property
    def uses_hidden_states(self) -> bool:
        """Plus reads the encoder's penultimate hidden states; plain its projected image embedding."""
        return self.config.kind == "plus"

    @property
    def layer_dims(self) -> list[int]:
        return [int(d) for d in self.config.layer_dims]

    @classmethod
    def from_layout(cls, layout: IPAdapterLayout) -> IPAdapterModel:
        """The model holding a published file's weights; the projection goes through diffusers' converter."""
        projection = _diffusers_image_projection(layout.image_proj)
        plus = layout.kind == "plus"
        if plus:
            first_q = next(v for k, v in layout.image_proj.items() if re.match(r"layers\.0\.(0|attn)\.to_q\.weight", k))
        model = cls(
            kind=layout.kind,
            image_embed_dim=layout.image_embed_dim,
            cross_attention_dim=layout.cross_attention_dim,
            layer_dims=layout.layer_dims,
            num_tokens=layout.num_tokens,
            resampler_dim=int(layout.image_proj["latents"].shape[2]) if plus else 768,
            resampler_heads=int(first_q.shape[0]) // RESAMPLER_HEAD_DIM if plus else 12,
        )
        dtype = layout.to_k_ip[0].dtype
        if dtype != model.dtype:
            model.to(dtype)
        model.image_projection.load_state_dict(projection.state_dict(), strict=True)
        with torch.no_grad():
            for linear, weight in zip(model.to_k_ip, layout.to_k_ip, strict=True):
                linear.weight.copy_(weight)
            for linear, weight in zip(model.to_v_ip, layout.to_v_ip, strict=True):
                linear.weight.copy_(weight)
        return model

    def to_layout(self) -> IPAdapterLayout:
        """This model's weights in the published layout (what :func:`save_ip_adapter` writes)."""
        state = {k: v.detach() for k, v in self.image_projection.state_dict().items()}
        return IPAdapterLayout(
            image_proj=_published_image_proj(self.config.kind, state),
            to_k_ip=[linear.weight.detach() for linear in self.to_k_ip],
            to_v_ip=[linear.weight.detach() for linear in self.to_v_ip],
        )

    def tokens(self, features: Tensor) -> Tensor:
        """CLIP features -> image tokens ``(B, num_tokens, cross_attention_dim)``."""
        dtype = next(self.image_projection.parameters()).dtype
        return self.image_projection(features.to(dtype))

    def layer_keys_values(self, tokens: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per cross-attention layer: ``to_k_ip(tokens)``, ``to_v_ip(tokens)`` of shape ``(B, N, layer_dim)``."""
        return [linear(tokens) for linear in self.to_k_ip], [linear(tokens) for linear in self.to_v_ip]


# ----------------------------------------------------------------------------------------- image encoder
def _size_value(size: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(size, name, None)
        if value is None and isinstance(size, Mapping):
            value = size.get(name)
        if value:
            return int(value)
    return None


class ImageEncoder(nn.Module):
    """A CLIP vision encoder (``CLIPVisionModelWithProjection``) and its preprocessing, on tensors.

    ``preprocess`` does what ``CLIPImageProcessor`` does (resize the short side, centre crop, normalise) on
    float ``(B, 3, H, W)`` images in [0, 1], differentiable and on the model's device; ``processor`` is kept
    for diffusers pipelines (``feature_extractor``). Frozen; ``id`` says which encoder for checkpoints.
    """

    def __init__(self, encoder: nn.Module, processor: Any = None, flavour: str = "pretrained") -> None:
        super().__init__()
        from transformers import CLIPImageProcessor

        self.encoder = encoder.requires_grad_(False).eval()
        image_size = int(encoder.config.image_size)
        self.processor = processor or CLIPImageProcessor(size=image_size, crop_size=image_size)
        self.flavour = flavour
        self.resize_to = _size_value(self.processor.size, "shortest_edge", "height") or image_size
        crop = self.processor.crop_size
        self.crop_to = (_size_value(crop, "height") or image_size, _size_value(crop, "width") or image_size)
        self.register_buffer("mean", torch.tensor(self.processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.processor.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def id(self) -> str:
        return f"clip_vision:{self.flavour}"

    @property
    def embed_dim(self) -> int:
        """Size of the projected image embedding (what a plain IP-Adapter reads)."""
        return int(self.encoder.config.projection_dim)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def train(self, mode: bool = True) -> ImageEncoder:
        del mode  # frozen: always eval
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Float images in [0, 1] ``(B, 3, H, W)`` -> normalised ``pixel_values`` at the encoder's size."""
        images = images.to(device=self.mean.device, dtype=torch.float32)
        height, width = images.shape[-2:]
        scale = self.resize_to / min(height, width)
        size = (max(round(height * scale), self.crop_to[0]), max(round(width * scale), self.crop_to[1]))
        if size != (height, width):
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.crop_to[0]) // 2, (size[1] - self.crop_to[1]) // 2
        images = images[..., top : top + self.crop_to[0], left : left + self.crop_to[1]].clamp(0, 1)
        pixels = (images - self.mean) / self.std
        return pixels.to(next(self.encoder.parameters()).dtype)

    def features(self, images: Tensor, hidden_states: bool = False) -> Tensor:
        """The projected image embedding ``(B, E)``, or the penultimate hidden states ``(B, S, H)``."""
        return self.encode_pixels(self.preprocess(images), hidden_states)

    def encode_pixels(self, pixel_values: Tensor, hidden_states: bool = False) -> Tensor:
        output = self.encoder(pixel_values, output_hidden_states=hidden_states)
        return output.hidden_states[-2] if hidden_states else output.image_embeds

    def unconditional(self, batch_size: int, hidden_states: bool = False) -> Tensor:
        """The "no image" features diffusers pairs with CFG: zero embeddings (plain), or the hidden states of an
        all-zero ``pixel_values`` input (plus)."""
        if not hidden_states:
            return torch.zeros(batch_size, self.embed_dim, device=self.mean.device, dtype=self.mean.dtype)
        dtype = next(self.encoder.parameters()).dtype
        zeros = torch.zeros(1, 3, *self.crop_to, device=self.mean.device, dtype=dtype)
        return self.encode_pixels(zeros, True).expand(batch_size, -1, -1)


TINY_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 24,
}
# OpenCLIP ViT-H/14, the image encoder of the SD1.5 IP-Adapters (h94/IP-Adapter models/image_encoder).
VIT_H_IMAGE_ENCODER: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def random_image_encoder(config: Mapping[str, Any], seed: int = 0, flavour: str = "tiny") -> ImageEncoder:
    """A random, seeded CLIP vision encoder of the given ``CLIPVisionConfig`` values."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    return ImageEncoder(encoder, flavour=flavour)


def tiny_image_encoder(seed: int = 0) -> ImageEncoder:
    """A random, seeded CLIP vision encoder (32 px, 16 patches, 24-d embedding) for tests and demos."""
    return random_image_encoder(TINY_IMAGE_ENCODER, seed, "tiny")


def load_image_encoder(
    path: str | os.PathLike[str], key: str = "image_encoder", dtype: torch.dtype | None = None
) -> ImageEncoder:
    """The CLIP vision encoder of a published IP-Adapter (e.g. h94/IP-Adapter ``models/image_encoder``), in
    ``dtype`` (default fp32); ``key`` names the path in errors."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    source = str(path)
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise UserError(
            f"{key}={source} is not a CLIP vision encoder directory (config.json missing); point it to the "
            "IP-Adapter's image_encoder folder"
        )
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(local) if looks_local else source, dtype=dtype or torch.float32
        )
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load the CLIP image encoder {key}={source} ({type(error).__name__}); give a local "
            "directory in the transformers layout (the IP-Adapter's image_encoder folder) or a reachable hub id"
        ) from None
    processor = None
    if looks_local and (local / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(local))
    return ImageEncoder(encoder, processor, flavour="pretrained")


# ------------------------------------------------------------------------------------------ tiny adapters
def random_ip_adapter(
    unet: nn.Module, image_encoder: ImageEncoder, kind: str = "plain", seed: int = 0
) -> IPAdapterModel:
    """A random, seeded IP-Adapter shaped for ``unet``'s cross-attention layers and ``image_encoder``."""
    layers = attention_layers(unet, "cross")
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers")
    width = layers[0].cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = IPAdapterModel(
            kind=kind,
            image_embed_dim=image_encoder.hidden_size if kind == "plus" else image_encoder.embed_dim,
            cross_attention_dim=width,
            layer_dims=[layer.inner_dim for layer in layers],
            num_tokens=PLUS_TOKENS if kind == "plus" else PLAIN_TOKENS,
            resampler_dim=width,
            resampler_heads=max(1, width // RESAMPLER_HEAD_DIM),
        )
    return model


def write_random_ip_adapter(
    path: str | os.PathLike[str], unet: nn.Module, image_encoder: ImageEncoder, kind: str = "plain", seed: int = 0
) -> Path:
    """Write a random IP-Adapter for ``unet`` (tiny for a tiny UNet) in the published layout (``.bin`` nested,
    ``.safetensors`` flat): what tests load as if it were a published file."""
    return save_ip_adapter(random_ip_adapter(unet, image_encoder, kind, seed).to_layout(), path)


# ------------------------------------------------------------------------------- diffusers' own loading
def check_fits_unet(layout: IPAdapterLayout, unet: nn.Module, key: str = "IP-Adapter") -> None:
    """One clear line when a file was made for another UNet (layer count or widths differ)."""
    layers = attention_layers(unet, "cross")
    if len(layers) != layout.num_layers:
        raise UserError(
            f"{key}: the IP-Adapter has {layout.num_layers} cross-attention layers, the UNet {len(layers)}; "
            "use the IP-Adapter made for this model (SD1.5: 16 layers, SDXL: 70)"
        )
    for index, layer in enumerate(layers):
        expected = (layer.inner_dim, layer.cross_attention_dim)
        if tuple(layout.to_k_ip[index].shape) != expected:
            raise UserError(
                f"{key}: ip_adapter.{ip_adapter_key(index)}.to_k_ip.weight is {tuple(layout.to_k_ip[index].shape)}, "
                f"layer {layer.name} needs {expected}; use the IP-Adapter made for this model"
            )


def as_layout(adapter: IPAdapterLayout | IPAdapterModel | str | os.PathLike[str]) -> IPAdapterLayout:
    if isinstance(adapter, IPAdapterLayout):
        return adapter
    if isinstance(adapter, IPAdapterModel):
        return adapter.to_layout()
    return read_ip_adapter(adapter)


def load_into_unet(
    unet: nn.Module,
    adapter: IPAdapterLayout | IPAdapterModel | str | os.PathLike[str],
    scale: float = 1.0,
    key: str = "IP-Adapter",
) -> Surgery:
    """Load an IP-Adapter into a diffusers ``UNet2DConditionModel`` through diffusers' own loader.

    Afterwards the UNet takes ``added_cond_kwargs={"image_embeds": unet_image_embeds(features)}`` (or a
    pipeline's ``ip_adapter_image=``) and runs ``IPAdapterAttnProcessor2_0`` in its cross-attention layers.
    ``remove()`` on the returned surgery (or leaving its ``with`` block) restores the UNet's processors,
    ``encoder_hid_proj`` and config bit for bit.
    """
    layout = as_layout(adapter)
    check_fits_unet(layout, unet, key)
    previous_processors = dict(unet.attn_processors)
    previous_projection = unet.encoder_hid_proj
    previous_type = unet.config.encoder_hid_dim_type
    dtype = unet.dtype
    nested = {part: {k: v.to(dtype) for k, v in values.items()} for part, values in layout.nested().items()}
    with _diffusers_errors_only():  # its own unet.to(unet.dtype) warns about casting to the same dtype
        unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    set_ip_adapter_scale(unet, scale)

    def undo() -> None:
        # the projection first: a Plus resampler has attention layers of its own, counted by set_attn_processor
        unet.encoder_hid_proj = previous_projection
        unet.config.encoder_hid_dim_type = previous_type
        unet.set_attn_processor(previous_processors)

    return Surgery(undo)


@contextmanager
def _diffusers_errors_only() -> Any:
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def set_ip_adapter_scale(unet: nn.Module, scale: float) -> None:
    """Set the image-prompt scale of every diffusers IP-Adapter processor in ``unet`` (0: text only)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    for processor in unet.attn_processors.values():
        if isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
            processor.scale = [float(scale)] * len(processor.scale)


def unet_image_embeds(features: Tensor) -> list[Tensor]:
    """CLIP features of one image per sample as the UNet's ``added_cond_kwargs["image_embeds"]`` (one adapter)."""
    return [features.unsqueeze(1)]


@contextmanager
def pipeline_image_encoder(pipe: Any, image_encoder: ImageEncoder) -> Any:
    """Give a diffusers pipeline this image encoder (``ip_adapter_image=`` then works) for the ``with`` block."""
    previous = (getattr(pipe, "image_encoder", None), getattr(pipe, "feature_extractor", None))
    pipe.register_modules(image_encoder=image_encoder.encoder, feature_extractor=image_encoder.processor)
    try:
        yield pipe
    finally:
        pipe.register_modules(image_encoder=previous[0], feature_extractor=previous[1])
