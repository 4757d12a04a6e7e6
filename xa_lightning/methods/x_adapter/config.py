"""X-Adapter's options (``method.mapper``, ``method.training``, ``method.sampling``, ``method.plugin``).

Each dataclass checks its values once, in ``__post_init__``, so a bad setting fails before any backbone
is loaded; mappings from the config become these classes through ``xa_lightning.config.coerce_options``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.mapper import FUSION_TYPES, INSERTION_PLACES
from xa_lightning.plugins import PLUGIN_KINDS
from xa_lightning.training.utils import check_init_weights

TIMESTEP_MODES = ("shared", "independent")
CONDITIONS = ("identity", "canny")


def smallest_adapter_guidance_start(steps: int) -> float:
    """The smallest alpha (4 decimals) for which stage 2 runs at least one of ``steps`` steps."""
    value = math.ceil(10_000 / steps) / 10_000
    while int(steps * value) < 1:  # 1/N is not exact in binary (49 * (1/49) < 1)
        value = round(value + 1e-4, 4)
    return value


def check_adapter_guidance_start(
    alpha: float, steps: int, key: str = "adapter_guidance_start", steps_key: str = "num_inference_steps"
) -> int:
    """The number of stage-2 steps, ``int(steps * alpha)``; a one-line UserError when it is not in 1..steps."""
    if steps < 1:
        raise UserError(f"{steps_key}={steps}: need at least 1 step")
    stage2 = int(steps * alpha)
    if not 0.0 < alpha <= 1.0 or stage2 < 1:
        raise UserError(
            f"{key}={alpha} gives int({steps} * {alpha}) = {stage2} X-Adapter steps out of {steps}; use a "
            f"value in [{smallest_adapter_guidance_start(steps)}, 1] (the smallest leaves one step)"
        )
    return stage2


@dataclass
class MapperOptions:
    """How the mapping layers are built (``method.mapper``), see :class:`XAdapterMapper`.

    ``insertion``: decoder (paper) | encoder | both. ``num_stages``: mapped blocks per place (paper: 3).
    ``block_pairs``: explicit ``[[base_block, upgraded_block], ...]`` instead of the derived pairs.
    ``init_weights``: start from the official ``X_Adapter_v1.bin`` or an exported mapper directory;
    ``require_init_weights``: refuse to run without them (evaluation experiments).
    """

    insertion: str = "decoder"
    num_stages: int = 3
    block_pairs: list[list[str]] | None = None
    num_res_blocks: int = 3
    kernel_size: int = 3
    fusion_type: str = "add"
    init_weights: str | None = None
    require_init_weights: bool = False

    def __post_init__(self) -> None:
        if self.insertion not in INSERTION_PLACES:
            raise UserError(f"method.mapper.insertion={self.insertion!r} is not one of {INSERTION_PLACES}")
        if self.fusion_type not in FUSION_TYPES:
            raise UserError(f"method.mapper.fusion_type={self.fusion_type!r} is not one of {FUSION_TYPES}")
        check_init_weights(
            self.init_weights,
            self.require_init_weights,
            "method.mapper.init_weights",
            "X_Adapter_v1.bin or a run's adapter/ export (or set X_ADAPTER_WEIGHTS)",
        )


@dataclass
class TrainingOptions:
    """The training recipe (``method.training``).

    ``null_text``: the upgraded model gets the empty prompt (paper); false: the caption (ablation).
    ``timesteps``: shared (one t for both models, paper default) | independent.
    ``gradient_checkpointing``: recompute the upgraded UNet's and the mapper's activations in backward.
    ``cached_upgraded_latents``: with a data cache, trust ``latents_<R>`` as the UPGRADED VAE's latents
    (a cache written with the base backbone holds base-VAE latents at R: those are wrong for SDXL).
    """

    null_text: bool = True
    timesteps: str = "shared"
    gradient_checkpointing: bool = False
    cached_upgraded_latents: bool = False

    def __post_init__(self) -> None:
        if self.timesteps not in TIMESTEP_MODES:
            raise UserError(f"method.training.timesteps={self.timesteps!r} must be shared or independent")


@dataclass
class SamplingOptions:
    """Two-stage sampling for evaluation (``method.sampling``); official defaults: DPM-Solver++ 50 steps,
    CFG 7.5, alpha (adapter_guidance_start) 0.7-1.0 per plugin, condition scale 1.0-1.5.

    ``base_prompt_suffix`` is appended to the base model's prompts only (a LoRA's trigger words, as the
    official LoRA example does with a separate SD1.5 prompt).
    """

    steps: int = 50
    scheduler: str = "dpmsolver++"
    guidance_scale: float = 7.5
    base_guidance_scale: float | None = None
    adapter_guidance_start: float = 0.8
    adapter_condition_scale: float = 1.0
    fusion_guidance_scale: float | None = None
    negative_prompt: str = ""
    base_prompt_suffix: str = ""
    progress: bool = False

    def __post_init__(self) -> None:
        check_adapter_guidance_start(
            self.adapter_guidance_start, self.steps, "method.sampling.adapter_guidance_start", "method.sampling.steps"
        )


@dataclass
class PluginOptions:
    """The plugins in evaluation (``method.plugin``); training is always plugin-free (each is switched on
    only while a sampler runs).

    ``kind``: the base model's plugin: none | controlnet | t2i_adapter | lora | ip_adapter. ``path``: hub id /
    local dir / LoRA or IP-Adapter file; null builds a tiny random one from the base UNet (demo, tests).
    ``scale``: conditioning scale / LoRA weight / IP-Adapter scale. ``condition``: how evaluation references
    become the ControlNet / T2I-Adapter input: identity (the references ARE control maps, e.g. canny maps:
    what edge_f1 compares against) | canny (OpenCV canny of reference photos); an IP-Adapter takes the
    reference image itself. ``img2img_strength``: stage 1 starts from the reference image noised to this
    strength (ControlNet tile: the reference is both the control and the init image).
    ``guess_mode``, ``control_guidance_start`` / ``control_guidance_end``: the ControlNet's, as in diffusers.
    ``image_encoder``: the IP-Adapter's CLIP vision encoder (dir / hub id; required with an IP-Adapter file).
    ``upgraded_lora`` / ``upgraded_lora_scale``: remix, a LoRA of the upgraded model active in every sampler
    that runs the upgraded model (``x_adapter``, ``upgraded``, ``sdedit``).
    """

    kind: str = "none"
    path: str | None = None
    scale: float = 1.0
    condition: str = "identity"
    img2img_strength: float | None = None
    lora_format: str | None = None
    guess_mode: bool = False
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    image_encoder: str | None = None
    upgraded_lora: str | None = None
    upgraded_lora_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PLUGIN_KINDS:
            raise UserError(f"method.plugin.kind={self.kind!r} is not one of {PLUGIN_KINDS}")
        if self.condition not in CONDITIONS:
            raise UserError(f"method.plugin.condition={self.condition!r} must be identity or canny")
        if self.img2img_strength is not None and not 0.0 < self.img2img_strength <= 1.0:
            raise UserError(f"method.plugin.img2img_strength={self.img2img_strength} must be in (0, 1] or null")
        if not 0.0 <= self.control_guidance_start < self.control_guidance_end <= 1.0:
            raise UserError(
                f"method.plugin.control_guidance_start={self.control_guidance_start} / control_guidance_end="
                f"{self.control_guidance_end}: need 0 <= start < end <= 1"
            )
        if self.kind == "ip_adapter" and self.path is not None and self.image_encoder is None:
            raise UserError(
                "method.plugin.image_encoder is required with an IP-Adapter file: the CLIP vision encoder it was "
                "trained with (h94/IP-Adapter models/image_encoder)"
            )
        for key in ("path", "image_encoder", "upgraded_lora"):
            _check_local(getattr(self, key), f"method.plugin.{key}")


def _check_local(path: str | None, key: str) -> None:
    """A value that looks like a local path must exist (hub ids are checked when loaded)."""
    looks_local = path is not None and (
        path.startswith((".", "/", "~")) or Path(path).suffix in (".safetensors", ".bin", ".pt")
    )
    if looks_local and not Path(path).expanduser().exists():
        raise UserError(f"{key}={path} does not exist")
