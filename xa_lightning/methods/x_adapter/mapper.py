"""X-Adapter mapping layers: base-model decoder features -> residuals for the upgraded model.

The mapper is a diffusers-style model (``ModelMixin, ConfigMixin``), so ``save_pretrained`` /
``from_pretrained`` work. Its config names the blocks it reads from the base model and writes into the
upgraded model, so a saved mapper knows where it plugs in. Channels and resampling per stage are derived
from the two UNets' block shapes by :func:`derive_mapping`, which is what lets tiny backbones and other
model pairs (SD2.1 -> SDXL, ...) work without code changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from xa_lightning.errors import UserError

FUSION_TYPES = ("add", "spade")
RESAMPLE_MODES = ("none", "transpose", "interpolate")
INSERTION_PLACES = ("decoder", "encoder", "both")


# ---------------------------------------------------------------------------------------- block shapes
@dataclass(frozen=True)
class BlockShape:
    """Output of one UNet block at a given latent size: ``name`` as in ``unet.get_submodule(name)``."""

    name: str
    channels: int
    size: tuple[int, int]


def _block_out_channels(block: nn.Module) -> int:
    resnets = getattr(block, "resnets", None)
    if not resnets:
        raise UserError(
            f"cannot read the output channels of {type(block).__name__}; set method.mapper."
            "base_blocks / upgraded_blocks to blocks of a diffusers UNet2DConditionModel"
        )
    return int(resnets[-1].out_channels)


def unet_block_shapes(unet: nn.Module, latent_size: tuple[int, int]) -> dict[str, list[BlockShape]]:
    """Encoder (``down_blocks.i``) and decoder (``mid_block``, ``up_blocks.i``) output shapes.

    Computed from the module structure (no forward pass, so it is free even for full-size models):
    a downsampler halves the size (rounding up, like its stride-2 conv), an upsampler restores the size
    of the matching skip connection, exactly as ``UNet2DConditionModel.forward`` does.
    """
    size = (int(latent_size[0]), int(latent_size[1]))
    skip_sizes: list[tuple[int, int]] = []
    encoder: list[BlockShape] = []
    for index, block in enumerate(unet.down_blocks):
        skip_sizes.append(size)
        if getattr(block, "downsamplers", None) is not None:
            size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
        encoder.append(BlockShape(f"down_blocks.{index}", _block_out_channels(block), size))
    decoder: list[BlockShape] = []
    if unet.mid_block is not None:
        decoder.append(BlockShape("mid_block", _block_out_channels(unet.mid_block), size))
    # Up block i consumes the skips of down block L-1-i; its upsampler restores the input size of down
    # block L-2-i (UNet2DConditionModel forwards that size when it is not a plain doubling).
    for index, block in enumerate(unet.up_blocks):
        if getattr(block, "upsamplers", None) is not None:
            size = skip_sizes[len(skip_sizes) - 2 - index]
        decoder.append(BlockShape(f"up_blocks.{index}", _block_out_channels(block), size))
    return {"encoder": encoder, "decoder": decoder}


@dataclass(frozen=True)
class MappingPair:
    """One mapping stage: a base block's output feeds a residual into an upgraded block's output."""

    base: BlockShape
    upgraded: BlockShape

    @property
    def resample(self) -> str:
        (bh, bw), (uh, uw) = self.base.size, self.upgraded.size
        if (bh, bw) == (uh, uw):
            return "none"
        if (uh, uw) in {(2 * bh, 2 * bw), (2 * bh - 1, 2 * bw - 1)}:
            return "transpose"  # the official mapper's stride-2 transposed conv
        return "interpolate"  # any other ratio (non power-of-two pairs): bilinear to the target size


def default_block_pairs(
    base: dict[str, list[BlockShape]],
    upgraded: dict[str, list[BlockShape]],
    insertion: str = "decoder",
    num_stages: int = 3,
) -> list[tuple[str, str]]:
    """The paper's rule, generalised: the base's LAST decoder blocks feed the upgraded model's FIRST ones.

    SD1.5 (mid, up0..3) -> SDXL (mid, up0..2) gives up1->mid, up2->up0, up3->up1: the official pairs,
    which match features of equal spatial size in pixel space (512 px /16 -> 1024 px /32, ...).
    The encoder mirrors it: the base's first encoder blocks feed the upgraded model's last ones.
    """
    if insertion not in INSERTION_PLACES:
        raise UserError(f"method.mapper.insertion={insertion!r} is not one of {INSERTION_PLACES}")
    pairs: list[tuple[str, str]] = []
    if insertion in ("encoder", "both"):
        count = min(num_stages, len(base["encoder"]), len(upgraded["encoder"]))
        pairs += [(b.name, u.name) for b, u in zip(base["encoder"][:count], upgraded["encoder"][-count:])]
    if insertion in ("decoder", "both"):
        count = min(num_stages, len(base["decoder"]), len(upgraded["decoder"]))
        pairs += [(b.name, u.name) for b, u in zip(base["decoder"][-count:], upgraded["decoder"][:count])]
    return pairs


def derive_mapping(
    base_unet: nn.Module,
    upgraded_unet: nn.Module,
    base_latent_size: tuple[int, int],
    upgraded_latent_size: tuple[int, int],
    insertion: str = "decoder",
    num_stages: int = 3,
    block_pairs: Sequence[Sequence[str]] | None = None,
) -> list[MappingPair]:
    """Mapping stages for two UNets, each at its native latent size.

    ``block_pairs`` overrides the default rule with explicit ``[base_block, upgraded_block]`` names.
    """
    base_shapes = unet_block_shapes(base_unet, base_latent_size)
    upgraded_shapes = unet_block_shapes(upgraded_unet, upgraded_latent_size)
    if block_pairs is None:
        block_pairs = default_block_pairs(base_shapes, upgraded_shapes, insertion, num_stages)
    base_by_name = {s.name: s for s in base_shapes["encoder"] + base_shapes["decoder"]}
    upgraded_by_name = {s.name: s for s in upgraded_shapes["encoder"] + upgraded_shapes["decoder"]}
    pairs = []
    for base_name, upgraded_name in block_pairs:
        if base_name not in base_by_name:
            raise UserError(
                f"method.mapper.block_pairs: base block {base_name!r} does not exist; "
                f"choose from {sorted(base_by_name)}"
            )
        if upgraded_name not in upgraded_by_name:
            raise UserError(
                f"method.mapper.block_pairs: upgraded block {upgraded_name!r} does not exist; "
                f"choose from {sorted(upgraded_by_name)}"
            )
        pairs.append(MappingPair(base_by_name[base_name], upgraded_by_name[upgraded_name]))
    if not pairs:
        raise UserError("method.mapper: no mapping pairs (num_stages must be >= 1)")
    return pairs


# ---------------------------------------------------------------------------------------- layers
class MappingResBlock(nn.Module):
    """3x3 conv, ReLU, 3x3 conv with an identity skip; an in-conv when channels change; optional x2 upsample."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, upsample: bool = False) -> None:
        super().__init__()
        padding = kernel_size // 2
        # The official mapper upsamples on the input channels, before changing the channel count.
        self.upsample = nn.ConvTranspose2d(in_channels, in_channels, 3, stride=2, padding=1) if upsample else None
        self.in_conv = (
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding) if in_channels != out_channels else None
        )
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x, output_size=output_size)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.conv2(self.act(self.conv1(x)))


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class MappingStage(nn.Module):
    """Residual blocks for one (base block -> upgraded block) pair, ending in zero-initialised 1x1 conv(s)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        kernel_size: int,
        resample: str,
        fusion_type: str,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.gradient_checkpointing = False  # switched by ModelMixin.enable_gradient_checkpointing
        self.blocks = nn.ModuleList(
            MappingResBlock(
                in_channels if i == 0 else out_channels,
                out_channels,
                kernel_size,
                upsample=(i == 0 and resample == "transpose"),
            )
            for i in range(num_res_blocks)
        )
        if fusion_type == "add":
            self.zero_out = _zero_conv(out_channels)
        else:  # SPADE: per-pixel scale and shift of the (normalised) upgraded feature
            self.gamma = _zero_conv(out_channels)
            self.beta = _zero_conv(out_channels)

    def forward(self, x: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        target_size = (int(target_size[0]), int(target_size[1]))
        if self.resample == "interpolate" and tuple(x.shape[-2:]) != target_size:
            x = F.interpolate(x, size=target_size, mode="bilinear", align_corners=False)
        for index, block in enumerate(self.blocks):
            output_size = target_size if index == 0 else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, output_size)
            else:
                x = block(x, output_size=output_size)
        # Other sizes than the mapper was built for (odd sizes at inference) are resized to the block's; training
        # refuses them up front (XAdapterModule.setup checks data.resolution against the models).
        if tuple(x.shape[-2:]) != target_size:
            x = F.interpolate(x, size=target_size, mode="bilinear", align_corners=False)
        if hasattr(self, "zero_out"):
            return self.zero_out(x)
        return self.gamma(x), self.beta(x)


class XAdapterMapper(ModelMixin, ConfigMixin):
    """X-Adapter's trainable mapping layers (one stage per mapped block pair).

    Each stage maps the output of ``base_blocks[i]`` (``in_channels[i]`` channels) to a residual for the
    output of ``upgraded_blocks[i]`` (``out_channels[i]`` channels) through ``num_res_blocks`` residual
    blocks and a zero-initialised 1x1 conv, so a fresh mapper leaves the upgraded model untouched.

    Fusion (:meth:`fuse`) is ``h + s * F(x)`` for ``fusion_type="add"`` (the paper's choice) and
    ``GroupNorm(h) * (1 + s * gamma(x)) + s * beta(x)`` for ``"spade"`` (the paper's ablation).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: Sequence[int] = (1280, 640, 320),
        out_channels: Sequence[int] = (1280, 1280, 640),
        resample: Sequence[str] = ("none", "none", "transpose"),
        base_blocks: Sequence[str] = ("up_blocks.1", "up_blocks.2", "up_blocks.3"),
        upgraded_blocks: Sequence[str] = ("mid_block", "up_blocks.0", "up_blocks.1"),
        num_res_blocks: int = 3,
        kernel_size: int = 3,
        fusion_type: str = "add",
    ) -> None:
        super().__init__()
        lengths = {len(in_channels), len(out_channels), len(resample), len(base_blocks), len(upgraded_blocks)}
        if len(lengths) != 1:
            raise UserError(
                "method.mapper: in_channels, out_channels, resample, base_blocks and upgraded_blocks "
                "must have one entry per stage"
            )
        if fusion_type not in FUSION_TYPES:
            raise UserError(f"method.mapper.fusion_type={fusion_type!r} is not one of {FUSION_TYPES}")
        for mode in resample:
            if mode not in RESAMPLE_MODES:
                raise UserError(f"method.mapper.resample entry {mode!r} is not one of {RESAMPLE_MODES}")
        if num_res_blocks < 1:
            raise UserError("method.mapper.num_res_blocks must be >= 1")
        self.stages = nn.ModuleList(
            MappingStage(cin, cout, num_res_blocks, kernel_size, mode, fusion_type)
            for cin, cout, mode in zip(in_channels, out_channels, resample)
        )
        if fusion_type == "spade":
            self.norms = nn.ModuleList(nn.GroupNorm(_groups(c), c, affine=False) for c in out_channels)

    @classmethod
    def from_unets(
        cls,
        base_unet: nn.Module,
        upgraded_unet: nn.Module,
        base_latent_size: tuple[int, int],
        upgraded_latent_size: tuple[int, int],
        insertion: str = "decoder",
        num_stages: int = 3,
        block_pairs: Sequence[Sequence[str]] | None = None,
        num_res_blocks: int = 3,
        kernel_size: int = 3,
        fusion_type: str = "add",
    ) -> XAdapterMapper:
        """A mapper whose stages are derived from the two UNets' block shapes."""
        pairs = derive_mapping(
            base_unet, upgraded_unet, base_latent_size, upgraded_latent_size, insertion, num_stages, block_pairs
        )
        return cls(
            in_channels=[p.base.channels for p in pairs],
            out_channels=[p.upgraded.channels for p in pairs],
            resample=[p.resample for p in pairs],
            base_blocks=[p.base.name for p in pairs],
            upgraded_blocks=[p.upgraded.name for p in pairs],
            num_res_blocks=num_res_blocks,
            kernel_size=kernel_size,
            fusion_type=fusion_type,
        )

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(
        self, base_features: Sequence[torch.Tensor], target_sizes: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor | tuple[torch.Tensor, ...]]:
        """Map the base features (one per stage) to mapped features at the upgraded blocks' sizes."""
        if len(base_features) != self.num_stages or len(target_sizes) != self.num_stages:
            raise ValueError(
                f"expected {self.num_stages} base features and target sizes, "
                f"got {len(base_features)} and {len(target_sizes)}"
            )
        dtype = next(self.parameters()).dtype
        return [
            stage(feature.to(dtype), size) for stage, feature, size in zip(self.stages, base_features, target_sizes)
        ]

    def fuse(
        self,
        stage: int,
        hidden: torch.Tensor,
        mapped: torch.Tensor | tuple[torch.Tensor, ...],
        scale: float | torch.Tensor = 1.0,
        fusion_guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Combine an upgraded-model feature with the mapped base feature of ``stage``.

        ``scale`` is the adapter condition scale ``s``. ``fusion_guidance_scale`` ``g`` (add fusion only),
        when set, moves the feature towards the scaled mapped residual as the official pipeline does:
        ``h + g * (s * F - h)``; ``None`` is the plain ``h + s * F`` the mapper was trained with.
        """
        if self.config.fusion_type == "add":
            residual = (mapped * scale).to(hidden.dtype)
            if fusion_guidance_scale is None:
                return hidden + residual
            return hidden + fusion_guidance_scale * (residual - hidden)
        gamma, beta = (m.to(hidden.dtype) for m in mapped)
        normalized = self.norms[stage](hidden.float()).to(hidden.dtype)
        return normalized * (1 + scale * gamma) + scale * beta


def _groups(channels: int) -> int:
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1
