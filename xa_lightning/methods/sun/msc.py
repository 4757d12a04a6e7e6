"""Distillation objectives for SUN: Multi-Step Consistency (MSC) and single-step CFG distillation.

The paper's exact MSC formula is not public; this is the reconstruction the project ships (see README):

``msc`` (default) — the student (UNet + SUN, no CFG) walks its own K-step DPM-Solver++ trajectory
    ``x_0 -> x_1 -> ... -> x_K`` on the student grid (4 steps: 999, 749, 499, 249 -> clean). At each
    student state ``x_i`` the CFG teacher (frozen UNet, DPM-Solver++) runs its sub-steps from ``x_i`` to the
    next student timestep; the student's single step from ``x_i`` (the same solver update it uses at
    inference, including its multistep history) must land on the teacher's point::

        L = sum_i w_i * || step_student(x_i) - solve_teacher(x_i, t_i -> t_{i+1}) ||^2 / sum_i w_i

    The next state is the student's own prediction (detached): the student learns from states it actually
    visits, so its errors cannot compound unseen. ``space="x"`` compares latents; ``space="eps"`` divides
    each error by the step's noise coefficient (the eps-equivalent error, every step on one scale).
``cfg_eps`` — single-step CFG distillation: at a noised data latent the student's output must equal the
    teacher's CFG output (eps or v). No trajectory; the ablation baseline "MSC vs single-step".
``weighted`` — both on the same noise: ``L = L_cfg_eps + msc_weight * L_msc`` (the CFG-distillation term
    anchors each single prediction, the MSC term the trajectory).

Memory: the K student calls of ``msc`` each keep their UNet activations for backward; with
``checkpoint_student`` each call is recomputed in backward instead, so at most one student call's
activations are alive (the gradients are the same; ``xa-bench sun --train`` shows the peak memory).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from xa_lightning.methods.sun.config import DistillationConfig
from xa_lightning.methods.sun.teacher import CFGTeacher, dpm_solver, substep_timesteps, trailing_timesteps

# (latents, timestep, encoder_hidden_states) -> model output, with SUN active
StudentFn = Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]


def _noise_coefficient(solver_alphas: torch.Tensor, t_from: int, t_to: int | None) -> float:
    """|d x_{t_to} / d eps| of a first-order DPM-Solver++ step: the eps-equivalent scale of a latent error.

    ``x_to = (s_to / s_from) x - a_to (e^{-h} - 1) x0_hat`` with ``x0_hat = (x - s_from eps) / a_from``,
    so the coefficient of eps is ``a_to (1 - e^{-h}) s_from / a_from`` (``e^{-h} = s_to a_from / (a_to s_from)``).
    """
    a_from = solver_alphas[t_from].sqrt()
    s_from = (1 - solver_alphas[t_from]).sqrt()
    if t_to is None:
        a_to, s_to = torch.tensor(1.0), torch.tensor(0.0)
    else:
        a_to, s_to = solver_alphas[t_to].sqrt(), (1 - solver_alphas[t_to]).sqrt()
    exp_neg_h = (s_to * a_from) / (a_to * s_from)
    return float(a_to * (1 - exp_neg_h) * s_from / a_from)


class SUNDistillation:
    """Computes the configured distillation loss for one batch (no Lightning inside: testable alone)."""

    def __init__(self, config: DistillationConfig, teacher: CFGTeacher, scheduler_config: Mapping[str, Any]) -> None:
        self.config = config
        self.teacher = teacher
        self.scheduler_config = dict(scheduler_config)
        self.student_grid = trailing_timesteps(self.scheduler_config, config.student_steps)
        self.substeps = config.teacher_substeps or max(1, round(teacher.num_steps / config.student_steps))
        solver = dpm_solver(self.scheduler_config)
        self.alphas_cumprod = solver.alphas_cumprod.float()
        self.num_train_timesteps = int(solver.config.num_train_timesteps)

    def teacher_plan(self) -> list[tuple[list[int], int | None]]:
        """For each student interval: the teacher's timesteps and where it lands (``None`` = clean sample)."""
        plan = []
        for i, start in enumerate(self.student_grid):
            end = self.student_grid[i + 1] if i + 1 < len(self.student_grid) else None
            plan.append((substep_timesteps(start, end, self.substeps), end))
        return plan

    def step_scales(self) -> list[float]:
        """Per-step loss weights: ``step_weights`` times, in eps space, 1 / noise coefficient^2."""
        weights = list(self.config.step_weights or [1.0] * len(self.student_grid))
        if self.config.space == "eps":
            ends: list[int | None] = [*self.student_grid[1:], None]
            weights = [
                w / _noise_coefficient(self.alphas_cumprod, s, e) ** 2
                for w, s, e in zip(weights, self.student_grid, ends)
            ]
        return weights

    def start_latents(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.config.start_from == "noise":
            return noise * dpm_solver(self.scheduler_config).init_noise_sigma
        t = self.student_grid[0]
        a = self.alphas_cumprod[t].to(latents.device, torch.float32)
        return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)

    def __call__(
        self,
        student: StudentFn,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        guidance_scales: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        objective = self.config.objective
        if objective == "msc":
            return self._msc(student, latents, noise, prompt_embeds, negative_embeds, guidance_scales)
        loss, logs = self._cfg_eps(student, latents, noise, prompt_embeds, negative_embeds, guidance_scales, generator)
        if objective == "weighted":
            msc, msc_logs = self._msc(student, latents, noise, prompt_embeds, negative_embeds, guidance_scales)
            loss = loss + self.config.msc_weight * msc
            logs = {**logs, **msc_logs, "msc": msc.detach()}
        return loss, logs

    def _student_call(self, student: StudentFn) -> StudentFn:
        if not (self.config.checkpoint_student and torch.is_grad_enabled()):
            return student

        def checkpointed(x: torch.Tensor, t: Any, states: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(student, x, t, states, use_reentrant=False)

        return checkpointed

    # ------------------------------------------------------------------ objectives
    def _msc(
        self,
        student: StudentFn,
        latents: torch.Tensor,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        guidance_scales: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from xa_lightning.methods.sun.attention import concat_negative

        student_states = concat_negative(prompt_embeds, negative_embeds)
        solver = dpm_solver(self.scheduler_config)
        solver.set_timesteps(self.config.student_steps, device=latents.device)
        x = self.start_latents(latents, noise)
        weights = self.step_scales()
        total = latents.new_zeros((), dtype=torch.float32)
        logs: dict[str, Any] = {}
        student = self._student_call(student)
        for i, (t, (teacher_steps, land_on)) in enumerate(zip(solver.timesteps, self.teacher_plan())):
            x = x.detach()
            output = student(x, t, student_states)
            x_student = solver.step(output, t, x).prev_sample
            target = self.teacher.solve(x, teacher_steps, prompt_embeds, negative_embeds, guidance_scales, land_on)
            error = (x_student.float() - target.float()).pow(2).mean()
            total = total + weights[i] * error
            logs[f"msc_step{i}"] = error.detach()
            if self.config.detach_history:
                solver.model_outputs = [m.detach() if m is not None else None for m in solver.model_outputs]
            x = x_student
        return total / sum(weights), logs

    def _cfg_eps(
        self,
        student: StudentFn,
        latents: torch.Tensor,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor,
        guidance_scales: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from xa_lightning.methods.sun.attention import concat_negative

        batch = latents.shape[0]
        if self.config.timestep_sampling == "student":
            grid = torch.tensor(self.student_grid)
            timesteps = grid[torch.randint(len(grid), (batch,), generator=generator)]
        else:
            timesteps = torch.randint(self.num_train_timesteps, (batch,), generator=generator)
        timesteps = timesteps.to(latents.device)
        a = self.alphas_cumprod.to(latents.device)[timesteps].view(-1, *([1] * (latents.ndim - 1)))
        noisy = (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)
        target = self.teacher.guided_output(noisy, timesteps, prompt_embeds, negative_embeds, guidance_scales)
        output = student(noisy, timesteps, concat_negative(prompt_embeds, negative_embeds))
        loss = (output.float() - target.float()).pow(2).mean()
        return loss, {"cfg_eps": loss.detach()}
