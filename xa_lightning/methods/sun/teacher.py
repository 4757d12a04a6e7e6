"""The CFG teacher SUN distils, and the DPM-Solver++ grids both sides use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from torch import nn

from xa_lightning.errors import UserError
from xa_lightning.methods.sun.adapter import SUNAdapter


def dpm_solver(scheduler_config: Mapping[str, Any], **overrides: Any) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M, trailing spacing) on the model's training noise schedule.

    Trailing spacing starts the 4-step grid at t=999, so the first step sees (nearly) pure noise.
    """
    options: dict[str, Any] = {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "timestep_spacing": "trailing",
        "use_karras_sigmas": False,
        "lower_order_final": True,
        "final_sigmas_type": "zero",
    }
    options.update(overrides)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return DPMSolverMultistepScheduler.from_config({**config, **options})


def trailing_timesteps(scheduler_config: Mapping[str, Any], num_steps: int) -> list[int]:
    """The timesteps an ``num_steps``-step DPM-Solver++ run visits (student: 999, 749, 499, 249)."""
    solver = dpm_solver(scheduler_config)
    solver.set_timesteps(num_steps)
    return [int(t) for t in solver.timesteps]


def substep_timesteps(start: int, end: int | None, count: int) -> list[int]:
    """Teacher timesteps from ``start`` towards ``end`` in ``count`` roughly equal sub-steps.

    With ``end`` the list closes with ``end`` (``count`` steps land exactly on it); with ``end=None``
    (the student's last step, which lands on the clean sample) it holds the ``count`` starting points and
    the solver's final ``sigma = 0`` closes the interval.
    """
    if end is None:
        grid = np.linspace(start, 0, count + 1)[:-1].round().astype(int).tolist()
    else:
        grid = np.linspace(start, end, count + 1).round().astype(int).tolist()
    unique: list[int] = []
    for t in grid:  # rounding can repeat a timestep when count exceeds the interval
        if not unique or t < unique[-1]:
            unique.append(int(t))
    return unique


class NegativePromptBank:
    """Negative prompts the teacher draws from, one per training sample.

    ``path`` is a text file with one prompt per line (blank lines and ``#`` comments skipped): the
    project's ``evaluation/negative_prompts.txt`` or the user's own. ``empty_probability`` makes some
    samples use the empty prompt, so the student also learns plain (prompt-only) sampling.
    """

    def __init__(
        self, path: str | Path | None = None, prompts: Sequence[str] | None = None, empty_probability: float = 0.0
    ) -> None:
        if prompts is None:
            if path is None:
                raise UserError(
                    "method.teacher.negative_prompts is not set; point it to a file with one "
                    "negative prompt per line (e.g. evaluation/negative_prompts.txt)"
                )
            path = Path(path)
            if not path.is_file():
                raise UserError(f"negative-prompt file {path} does not exist; fix method.teacher.negative_prompts")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"negative-prompt file {path} is not UTF-8 text; save it as UTF-8") from error
            prompts = [line.strip() for line in text.splitlines()]
            prompts = [p for p in prompts if p and not p.startswith("#")]
            if not prompts:
                raise UserError(f"negative-prompt file {path} holds no prompts; write one per line")
        if not 0.0 <= empty_probability <= 1.0:
            raise UserError(f"method.teacher.empty_negative_probability={empty_probability} must be in [0, 1]")
        self.prompts = list(prompts)
        self.empty_probability = float(empty_probability)

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, count: int, generator: torch.Generator | None = None) -> list[str]:
        index = torch.randint(len(self.prompts), (count,), generator=generator).tolist()
        empty = torch.rand(count, generator=generator).lt(self.empty_probability).tolist()
        return ["" if e else self.prompts[i] for i, e in zip(index, empty)]


class CFGTeacher:
    """The frozen UNet with classifier-free guidance, sampled with DPM-Solver++.

    ``guidance(prompt, negative) = out(negative) + w * (out(prompt) - out(negative))`` from ONE UNet call on
    the doubled batch. ``w`` is ``guidance_scale`` or, with ``guidance_scale_range=(lo, hi)``, drawn
    uniformly per sample. When a SUN adapter is installed in the same UNet it is disabled for the teacher's
    calls, so the teacher is exactly the original model.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler_config: Mapping[str, Any],
        adapter: SUNAdapter | None = None,
        num_steps: int = 25,
        guidance_scale: float = 7.5,
        guidance_scale_range: Sequence[float] | None = None,
    ) -> None:
        if num_steps < 1:
            raise UserError(f"method.teacher.num_steps={num_steps} must be >= 1")
        if guidance_scale_range is not None:
            lo, hi = (float(v) for v in guidance_scale_range)
            if not 1.0 <= lo <= hi:
                raise UserError(
                    f"method.teacher.guidance_scale_range={list(guidance_scale_range)} must be [lo, hi] "
                    "with 1 <= lo <= hi"
                )
            guidance_scale_range = (lo, hi)
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.adapter = adapter
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.guidance_scale_range = guidance_scale_range

    def sample_guidance_scales(
        self, count: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.guidance_scale_range is None:
            return torch.full((count,), self.guidance_scale, device=device)
        lo, hi = self.guidance_scale_range
        return (lo + (hi - lo) * torch.rand(count, generator=generator)).to(device)

    def _disabled(self) -> Any:
        if self.adapter is None:
            from contextlib import nullcontext

            return nullcontext()
        return self.adapter.disabled()

    @torch.no_grad()
    def guided_output(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        guidance_scales: torch.Tensor,
    ) -> torch.Tensor:
        """CFG model output (eps or v, whatever the UNet predicts) for a batch, in one UNet call."""
        if torch.is_tensor(timestep) and timestep.ndim == 1:  # per-sample timesteps follow the doubled batch
            timestep = torch.cat([timestep, timestep])
        dtype = self.unet.dtype
        with self._disabled():
            both = self.unet(
                torch.cat([latents, latents]).to(dtype),
                timestep,
                encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]).to(dtype),
            ).sample
        unconditional, conditional = both.float().chunk(2)
        scale = guidance_scales.float().view(-1, *([1] * (latents.ndim - 1)))
        return (unconditional + scale * (conditional - unconditional)).to(latents.dtype)

    @torch.no_grad()
    def solve(
        self,
        latents: torch.Tensor,
        timesteps: Sequence[int],
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        guidance_scales: torch.Tensor,
        land_on: int | None,
    ) -> torch.Tensor:
        """Run DPM-Solver++ from ``latents`` at ``timesteps[0]`` through ``timesteps`` to ``land_on``.

        ``land_on`` must be ``timesteps[-1]`` (the solver then takes ``len(timesteps) - 1`` steps and stops
        on it) or ``None`` (it takes every step and lands on the clean sample).
        """
        solver = dpm_solver(self.scheduler_config)
        solver.set_timesteps(timesteps=list(timesteps), device=latents.device)
        steps = list(solver.timesteps)[:-1] if land_on is not None else list(solver.timesteps)
        for t in steps:
            output = self.guided_output(latents, t, prompt_embeds, negative_embeds, guidance_scales)
            latents = solver.step(output, t, latents).prev_sample
        return latents
