"""SUN's options (``method.adapter``, ``method.teacher``, ``method.distillation``, ``method.sampling``).

Each dataclass checks its values once, in ``__post_init__``, so a bad setting fails before any backbone
is loaded; mappings from the config become these classes through ``xa_lightning.config.coerce_options``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from xa_lightning.errors import UserError
from xa_lightning.paths import repo_root
from xa_lightning.training.utils import check_init_weights


@dataclass
class SUNAdapterOptions:
    """How the adapter is built (``method.adapter``); see :meth:`SUNAdapter.from_unet`.

    ``init_weights``: start from trained weights instead: an official ``sun_adapter_*.safetensors`` or an
    xa-lightning adapter export directory (fine-tuning / evaluating released weights);
    ``require_init_weights``: refuse to start without them (evaluation-only experiments).
    """

    use_positive_branch: bool = False
    norm_scope: str = "sample"
    norm_eps: float = 1e-6
    alpha_init: float = 1.0
    beta_init: float = 0.0
    projection_init: str = "copy"
    init_weights: str | None = None
    require_init_weights: bool = False

    def __post_init__(self) -> None:
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
    ``teacher_<name>`` (that UNet with CFG, 25 steps).
    """

    steps: int = 4
    negative_prompt: str = "worst quality, low quality, blurry, watermark, text"
    progress: bool = False
    plugin_unets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.plugin_unets = {str(k): str(v) for k, v in dict(self.plugin_unets or {}).items()}
        for name in self.plugin_unets:
            if not name.isidentifier():
                raise UserError(f"method.sampling.plugin_unets.{name}: use a plain name (letters, digits, _)")


OBJECTIVES = ("msc", "cfg_eps")
SPACES = ("x", "eps")
START_FROM = ("data", "noise")
TIMESTEP_SAMPLING = ("student", "uniform")


@dataclass
class DistillationConfig:
    """Options of the SUN distillation loss (``method.distillation`` in the config).

    Attributes:
        objective: ``"msc"`` (multi-step consistency) or ``"cfg_eps"`` (single-step CFG distillation).
        student_steps: steps of the student trajectory (4).
        teacher_substeps: teacher DPM-Solver++ steps per student interval; ``None``: the teacher's step
            count spread over the intervals (round(teacher_steps / student_steps), 6 for 25 / 4).
        space: ``"x"`` (latent error) or ``"eps"`` (error divided by the step's noise coefficient).
        step_weights: extra per-student-step weights (length ``student_steps``), e.g. ``[1, 1, 1, 2]``.
        start_from: ``"data"`` (noised training latents at the first student timestep) or ``"noise"``.
        detach_history: cut gradients through the solver's previous model outputs (the 2M history).
        timestep_sampling: ``cfg_eps`` only: ``"student"`` (the student grid) or ``"uniform"`` (0..T-1).
    """

    objective: str = "msc"
    student_steps: int = 4
    teacher_substeps: int | None = None
    space: str = "x"
    step_weights: Sequence[float] | None = None
    start_from: str = "data"
    detach_history: bool = True
    timestep_sampling: str = "student"

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
