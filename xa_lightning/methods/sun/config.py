"""SUN's options (``method.adapter``, ``method.teacher``, ``method.distillation``, ``method.sampling``).

Each dataclass checks its values once, in ``__post_init__``, so a bad setting fails before any backbone
is loaded; mappings from the config become these classes through ``xa_lightning.config.coerce_options``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xa_lightning.errors import UserError
from xa_lightning.paths import repo_root
from xa_lightning.training.utils import check_init_weights

NORM_SCOPES = ("sample", "token")
PROJECTION_INITS = ("copy", "random", "zero")


@dataclass
class SUNAdapterOptions:
    """How the adapter is built (``method.adapter``); see :meth:`SUNAdapter.from_unet`.

    ``alpha_init: 0`` (default) starts SUN as the identity: every layer outputs ``Zp``, the student is the
    frozen model exactly, and training moves it from there (the paper's alpha = 1 with copied projections
    starts each layer at ``Zp - |Zp| Zn / |Zn|``, far from any model; ``alpha_init: 1`` gives that).
    ``init_weights``: start from trained weights instead: an official ``sun_adapter_*.safetensors`` or an
    xa-lightning adapter export directory (fine-tuning / evaluating released weights);
    ``require_init_weights``: refuse to start without them (evaluation-only experiments).
    ``scale_lr``: learning rate of the Attention Normalization scales ``alpha`` / ``beta`` (a second AdamW
    group, ``scales``, beside ``projections``); null: one group at ``method.optimizer.lr``. From the identity
    (``alpha_init: 0``) the correction grows with ``alpha``, slowly at lr 1e-5: its own rate speeds that up.
    """

    use_positive_branch: bool = False
    norm_scope: str = "sample"
    norm_eps: float = 1e-6
    alpha_init: float = 0.0
    beta_init: float = 0.0
    projection_init: str = "copy"
    init_weights: str | None = None
    require_init_weights: bool = False
    scale_lr: float | None = None

    def __post_init__(self) -> None:
        if self.scale_lr is not None and not float(self.scale_lr) > 0:
            raise UserError(f"method.adapter.scale_lr={self.scale_lr}: must be positive (null: the optimizer's lr)")
        # Checked here, before any backbone loads (SUNAdapter checks again for direct callers).
        for key, value, choices in (
            ("norm_scope", self.norm_scope, NORM_SCOPES),
            ("projection_init", self.projection_init, PROJECTION_INITS),
        ):
            if value not in choices:
                raise UserError(f"method.adapter.{key}={value!r}: choose one of {', '.join(choices)}")
        check_init_weights(
            self.init_weights,
            self.require_init_weights,
            "method.adapter.init_weights",
            "the official sun_adapter_*.safetensors or an xa-lightning SUN adapter export directory",
        )


@dataclass
class TeacherOptions:
    """The CFG teacher (``method.teacher``).

    ``guidance_scale_range`` ``[lo, hi]``: draw the teacher's CFG scale per sample (the student then
    learns the average behaviour over that range); null: always ``guidance_scale``.
    ``negative_prompts``: file with one negative prompt per line, one drawn per sample (null: the
    checkout's ``evaluation/negative_prompts.txt``);
    ``empty_negative_probability``: share of samples that get the empty negative prompt instead.
    """

    num_steps: int = 25
    guidance_scale: float = 7.5
    guidance_scale_range: list[float] | None = None
    negative_prompts: str | None = None
    empty_negative_probability: float = 0.1

    def __post_init__(self) -> None:
        if self.negative_prompts is None:  # the project's list, when running from a checkout
            default = repo_root() / "evaluation" / "negative_prompts.txt"
            self.negative_prompts = str(default) if default.is_file() else None


@dataclass
class SamplingOptions:
    """Evaluation / sampling settings (``method.sampling``).

    ``steps``: the student's steps; ``negative_prompt``: used by the SUN sampler and by the teacher
    baseline alike (same prompts, seeds and negative prompt). ``plugin_unets``: name -> hub id or local
    directory of a fine-tuned UNet of the same architecture (a diffusers model dir, or a pipeline dir with
    ``unet/``); each adds the samplers ``sun_<name>`` (this adapter plugged in, no retraining) and
    ``teacher_<name>`` (that UNet with CFG, 25 steps). ``lcm_lora``: an LCM-LoRA for the backbone (hub id,
    dir or file); adds the baseline sampler ``lcm_lora`` (LCMScheduler, ``steps`` steps, CFG
    ``lcm_lora_guidance_scale``: 1 = none, the negative prompt then unused, as LCM-LoRA recommends).
    """

    steps: int = 4
    negative_prompt: str = "worst quality, low quality, blurry, watermark, text"
    progress: bool = False
    plugin_unets: dict[str, str] = field(default_factory=dict)
    lcm_lora: str | None = None
    lcm_lora_guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"method.sampling.steps={self.steps} must be >= 1")
        unets = dict(self.plugin_unets or {})
        for name, source in unets.items():
            if not str(name).isidentifier():
                raise UserError(f"method.sampling.plugin_unets.{name}: use a plain name (letters, digits, _)")
            if source in (None, ""):
                raise UserError(
                    f"method.sampling.plugin_unets.{name} is not set: give the path (or hub id) of a fine-tuned "
                    "SD1.5 UNet in the diffusers layout (a UNet dir or a pipeline dir with unet/)"
                )
        self.plugin_unets = {str(k): str(v) for k, v in unets.items()}
        local = self.lcm_lora is not None and self.lcm_lora.startswith((".", "/", "~"))
        if local and not Path(self.lcm_lora).expanduser().exists():
            raise UserError(f"method.sampling.lcm_lora={self.lcm_lora} does not exist; give the LCM-LoRA's path")
        if self.lcm_lora_guidance_scale < 1.0:
            raise UserError(f"method.sampling.lcm_lora_guidance_scale={self.lcm_lora_guidance_scale} must be >= 1")


OBJECTIVES = ("msc", "cfg_eps", "weighted")
SPACES = ("x", "eps")
START_FROM = ("data", "noise")
TIMESTEP_SAMPLING = ("student", "uniform")


@dataclass
class DistillationConfig:
    """Options of the SUN distillation loss (``method.distillation`` in the config).

    Attributes:
        objective: ``"msc"`` (multi-step consistency), ``"cfg_eps"`` (single-step CFG distillation) or
            ``"weighted"`` (``cfg_eps + msc_weight * msc`` on the same noise).
        msc_weight: lambda of the weighted objective.
        student_steps: steps of the student trajectory (4).
        teacher_substeps: teacher DPM-Solver++ steps per student interval; ``None``: the teacher's step
            count spread over the intervals (round(teacher_steps / student_steps), 6 for 25 / 4).
        space: ``"x"`` (latent error) or ``"eps"`` (error divided by the step's noise coefficient).
        step_weights: extra per-student-step weights (length ``student_steps``), e.g. ``[1, 1, 1, 2]``.
        start_from: ``"data"`` (noised training latents at the first student timestep) or ``"noise"``.
        detach_history: cut gradients through the solver's previous model outputs (the 2M history).
        timestep_sampling: ``cfg_eps`` / ``weighted``: ``"student"`` (the student grid) or ``"uniform"`` (0..T-1).
        checkpoint_student: recompute each student step's UNet activations in backward instead of keeping all
            ``student_steps`` graphs alive: peak memory of one student call, the same gradients, one more
            student forward per step (small next to the teacher's sub-steps).
    """

    objective: str = "msc"
    msc_weight: float = 1.0
    student_steps: int = 4
    teacher_substeps: int | None = None
    space: str = "x"
    step_weights: Sequence[float] | None = None
    start_from: str = "data"
    detach_history: bool = True
    timestep_sampling: str = "student"
    checkpoint_student: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("objective", OBJECTIVES),
            ("space", SPACES),
            ("start_from", START_FROM),
            ("timestep_sampling", TIMESTEP_SAMPLING),
        ]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise UserError(f"method.distillation.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.msc_weight < 0:
            raise UserError(f"method.distillation.msc_weight={self.msc_weight} must be >= 0")
        if self.student_steps < 1:
            raise UserError(f"method.distillation.student_steps={self.student_steps} must be >= 1")
        if self.teacher_substeps is not None and self.teacher_substeps < 1:
            raise UserError(f"method.distillation.teacher_substeps={self.teacher_substeps} must be >= 1 or null")
        if self.step_weights is not None:
            self.step_weights = [float(w) for w in self.step_weights]
            if len(self.step_weights) != self.student_steps:
                raise UserError(
                    f"method.distillation.step_weights has {len(self.step_weights)} entries; "
                    f"give one per student step ({self.student_steps})"
                )
