"""A4A's options (``method.pta``, ``method.adapter``, ``method.training``, ``method.learning_rates``,
``method.sampling``).

Each dataclass checks its values once, in ``__post_init__``, so a bad setting fails before any backbone is
loaded; mappings from the config become these classes through ``xa_lightning.config.coerce_options``.
conf/method/a4a.yaml lists every field with the same default (a test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xa_lightning.errors import UserError
from xa_lightning.plugins.ip_adapter import KINDS
from xa_lightning.training.utils import check_init_weights

VARIANTS = ("a4a", "from_scratch")
UPGRADED_FAMILIES = ("sdxl", "pixart_alpha")


def _check_path(value: str | None, key: str, expected: str) -> None:
    if value not in (None, "") and not Path(value).expanduser().exists():
        raise UserError(f"{key}={value} does not exist; set it to the path of {expected}")


def _probability(value: float, key: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{key}={value} must be a probability in [0, 1]")
    return value


def _positive(value: float, key: str) -> float:
    value = float(value)
    if value <= 0:
        raise UserError(f"{key}={value} must be > 0")
    return value


@dataclass
class PTAOptions:
    """The pretrained adapter A4A transfers (``method.pta``): the SD1.5 IP-Adapter and its image encoder.

    ``weights``: the published SD1.5 IP-Adapter file (``ip-adapter_sd15.bin``, ``ip-adapter-plus_sd15.bin`` or
    ``.safetensors``); ``image_encoder``: its CLIP vision encoder directory (h94/IP-Adapter ``models/image_encoder``,
    ViT-H/14). Null builds random stand-ins shaped like SD1.5's IP-Adapter at the upgraded backbone's flavour
    (tiny: the tiny SD1.5 and a tiny CLIP; full_shape: the real shapes) - only beside random backbones (demos,
    tests, benchmarks), never a pretrained one. ``kind``: the stand-in's image projection, plain (4 tokens) |
    plus (resampler, 16 tokens); a file says which it is. ``seed``: the stand-ins' init.
    """

    weights: str | None = None
    image_encoder: str | None = None
    kind: str = "plain"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"method.pta.kind={self.kind!r} is not one of {KINDS}")
        _check_path(self.weights, "method.pta.weights", "the SD1.5 IP-Adapter file (ip-adapter_sd15.bin)")
        _check_path(self.image_encoder, "method.pta.image_encoder", "the IP-Adapter's image_encoder folder")


@dataclass
class AdapterOptions:
    """The A4A modules (``method.adapter``), see :class:`~xa_lightning.methods.a4a.modules.A4AAdapter`.

    ``scm_dim``: width of the coupling space (null: the least common multiple of the PTA's layer widths,
    1280 for SD1.5). ``repeats``: R, the Upgraded Space Mapping's attention + FFN blocks; ``heads`` their
    attention heads (must divide ``scm_dim``), ``ffn_mult`` the FFN's hidden width / ``scm_dim``.
    ``use_projection`` / ``use_mapping``: the ablations without the Coupling Space Projection (the mapping
    reads the image tokens through one linear) or without the Upgraded Space Mapping (each upgraded layer
    reads the PTA layer at the same relative depth). ``init_weights``: an exported A4A adapter directory to
    start from (``require_init_weights``: refuse to run without one, evaluation-only experiments).
    """

    scm_dim: int | None = None
    repeats: int = 2
    heads: int = 8
    ffn_mult: int = 4
    use_projection: bool = True
    use_mapping: bool = True
    init_weights: str | None = None
    require_init_weights: bool = False

    def __post_init__(self) -> None:
        if self.scm_dim is not None and int(self.scm_dim) < 1:
            raise UserError(f"method.adapter.scm_dim={self.scm_dim} must be a positive width or null (lcm)")
        for key in ("repeats", "heads", "ffn_mult"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"method.adapter.{key}={getattr(self, key)} must be >= 1")
        check_init_weights(
            self.init_weights,
            self.require_init_weights,
            "method.adapter.init_weights",
            "the adapter/ export directory of an A4A run",
        )


@dataclass
class TrainingOptions:
    """The training recipe (``method.training``).

    ``finetune_pta``: train the PTA's image projection and per-layer ``to_k_ip`` / ``to_v_ip`` too (at
    ``learning_rates.pta``; the CLIP image encoder always stays frozen); false: the PTA is frozen (paper
    default; Fig. 8 compares both). Condition dropout as IP-Adapter training does it, one draw per sample:
    ``image_dropout`` (no image: the unconditional image features), ``text_dropout`` (empty caption),
    ``both_dropout``. ``scale``: lambda during training (paper: 1). ``gradient_checkpointing``: recompute the
    upgraded model's activations in backward.
    """

    finetune_pta: bool = False
    image_dropout: float = 0.05
    text_dropout: float = 0.05
    both_dropout: float = 0.05
    scale: float = 1.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("image_dropout", "text_dropout", "both_dropout"):
            setattr(self, key, _probability(getattr(self, key), f"method.training.{key}"))
        if self.image_dropout + self.text_dropout + self.both_dropout > 1.0:
            raise UserError("method.training: image_dropout + text_dropout + both_dropout must not exceed 1")


@dataclass
class LearningRates:
    """Asynchronous learning rates (``method.learning_rates``): one AdamW parameter group each, logged as
    ``lr-AdamW/<group>``. ``projection_alignment``: Coupling Space Projection + Alignment (paper 1e-5);
    ``mapping``: the Upgraded Space Mapping, K and V (1e-4); ``pta``: the PTA when
    ``training.finetune_pta`` (1e-6); ``from_scratch``: the IP-Adapter* baseline (variant from_scratch)."""

    projection_alignment: float = 1e-5
    mapping: float = 1e-4
    pta: float = 1e-6
    from_scratch: float = 1e-4

    def __post_init__(self) -> None:
        for key in ("projection_alignment", "mapping", "pta", "from_scratch"):
            setattr(self, key, _positive(getattr(self, key), f"method.learning_rates.{key}"))


@dataclass
class SamplingOptions:
    """Evaluation sampling (``method.sampling``): every sampler uses the upgraded model's own scheduler with
    ``steps`` steps and CFG ``guidance_scale`` (the unconditional branch gets the "no image" features too).

    ``scale``: lambda at inference. Baselines: ``upgraded`` (the plain upgraded model), ``pta_base`` (SD1.5 +
    the PTA through diffusers; needs ``method.base_backbone``), ``pta_um`` (the upgraded model's own published
    IP-Adapter through diffusers, SDXL only: ``pta_um_weights`` + ``pta_um_image_encoder``; null beside a random
    backbone: random stand-ins).
    """

    steps: int = 30
    guidance_scale: float = 5.0
    scale: float = 1.0
    negative_prompt: str = ""
    upgraded: bool = True
    pta_base: bool = True
    pta_um: bool = False
    pta_um_weights: str | None = None
    pta_um_image_encoder: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise UserError(f"method.sampling.steps={self.steps} must be >= 1")
        _check_path(self.pta_um_weights, "method.sampling.pta_um_weights", "the SDXL IP-Adapter (ip-adapter_sdxl.bin)")
        _check_path(
            self.pta_um_image_encoder,
            "method.sampling.pta_um_image_encoder",
            "the SDXL IP-Adapter's image encoder folder (sdxl_models/image_encoder)",
        )
