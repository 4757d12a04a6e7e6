"""``BackboneConfig``: the schema of the ``backbone`` Hydra group (conf/backbone/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from xa_lightning.errors import UserError

FAMILY_NAMES = ("sd15", "sdxl", "pixart_alpha")
FLAVOURS = ("tiny", "full_shape", "pretrained")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
ATTENTION_NAMES = ("sdpa", "math")


@dataclass
class BackboneConfig:
    """One frozen backbone, as ``build_backbone`` takes it.

    ``family``: sd15 | sdxl | pixart_alpha. ``flavour``: tiny | full_shape | pretrained. ``path``: hub id or local
    diffusers directory (pretrained only; None = the family's official id). ``seed``: init seed (tiny,
    full_shape). ``dtype``: fp32 | fp16 | bf16 for denoiser and text encoders; ``vae_dtype``: the VAE's (None =
    dtype). ``variant`` / ``revision``: passed to ``from_pretrained`` (e.g. variant=fp16).
    Speed / memory levers (every method gets them through its backbones; ``xa-bench`` measures them):
    ``attention``: sdpa (PyTorch's fused scaled-dot-product attention, diffusers' default) | math (plain
    matmul-softmax-matmul, the reference); ``channels_last``: UNet / VAE convolutions in NHWC memory layout
    (faster convolutions on tensor-core GPUs); ``compile``: ``torch.compile`` the frozen denoiser's forward
    (compiled at its first call, with the method's processors and hooks inside it).
    The lead's validator merges user configs into this dataclass (OmegaConf.structured) to reject unknown keys
    and wrong types; ``__post_init__`` rejects wrong values, naming the key.
    """

    family: str = "sd15"
    flavour: str = "tiny"
    path: str | None = None
    seed: int = 0
    dtype: str = "fp32"
    vae_dtype: str | None = None
    variant: str | None = None
    revision: str | None = None
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILY_NAMES:
            raise UserError(f"backbone.family={self.family!r} is unknown; use one of {', '.join(FAMILY_NAMES)}")
        if self.flavour not in FLAVOURS:
            raise UserError(f"backbone.flavour={self.flavour!r} is unknown; use one of {', '.join(FLAVOURS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"backbone.seed={self.seed!r} must be an integer")
        for key in ("dtype", "vae_dtype"):
            value = getattr(self, key)
            if value is None and key == "vae_dtype":
                continue
            if value not in DTYPE_NAMES:
                raise UserError(f"backbone.{key}={value!r} is not a dtype; use one of {', '.join(DTYPE_NAMES)}")
        if self.path is not None and self.flavour != "pretrained":
            raise UserError(
                f"backbone.path is only used with backbone.flavour=pretrained (flavour is {self.flavour}); "
                "set backbone.path=null or backbone.flavour=pretrained"
            )
        if self.attention not in ATTENTION_NAMES:
            raise UserError(
                f"backbone.attention={self.attention!r} is unknown; use one of {', '.join(ATTENTION_NAMES)}"
            )
        for key in ("channels_last", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"backbone.{key}={getattr(self, key)!r} must be true or false")
        for key in ("path", "variant", "revision"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise UserError(f"backbone.{key}={value!r} must be a string or null")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BackboneConfig:
        """Validate a plain dict: unknown keys are reported by name (typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"backbone.{unknown[0]} is not a backbone setting; valid keys: {', '.join(sorted(known))}")
        return cls(**values)
