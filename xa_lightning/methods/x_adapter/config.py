"""X-Adapter's options (``method.mapper``, ``method.training``, ``method.sampling``, ``method.plugin``).

Each dataclass checks its values once, in ``__post_init__``, so a bad setting fails before any backbone
is loaded; mappings from the config become these classes through ``xa_lightning.config.coerce_options``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.mapper import FUSION_TYPES, INSERTION_PLACES
from xa_lightning.plugins import PLUGIN_KINDS
from xa_lightning.training.utils import check_init_weights

TIMESTEP_MODES = ("shared", "independent")
CONDITIONS = ("identity", "canny")


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


@dataclass
class PluginOptions:
    """The base model's plugin in evaluation (``method.plugin``); training is always plugin-free.

    ``kind``: none | controlnet | t2i_adapter | lora. ``path``: hub id / local dir / LoRA file; null builds
    a tiny random one from the base UNet (demo, tests). ``scale``: conditioning scale / LoRA weight.
    ``condition``: how evaluation references become the ControlNet / T2I-Adapter input: identity (the
    references ARE control maps, e.g. canny maps: what edge_f1 compares against) | canny (OpenCV canny of
    reference photos). ``img2img_strength``: stage 1 starts from the reference image noised to this strength
    (ControlNet tile: the reference is both the control and the init image).
    """

    kind: str = "none"
    path: str | None = None
    scale: float = 1.0
    condition: str = "identity"
    img2img_strength: float | None = None
    lora_format: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PLUGIN_KINDS:
            raise UserError(f"method.plugin.kind={self.kind!r} is not one of {PLUGIN_KINDS}")
        if self.condition not in CONDITIONS:
            raise UserError(f"method.plugin.condition={self.condition!r} must be identity or canny")
        if self.img2img_strength is not None and not 0.0 < self.img2img_strength <= 1.0:
            raise UserError(f"method.plugin.img2img_strength={self.img2img_strength} must be in (0, 1] or null")
        looks_local = self.path is not None and (
            self.path.startswith((".", "/", "~")) or Path(self.path).suffix in (".safetensors", ".bin", ".pt")
        )
        if looks_local and not Path(self.path).expanduser().exists():
            raise UserError(f"method.plugin.path={self.path} does not exist")
