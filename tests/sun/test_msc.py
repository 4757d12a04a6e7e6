"""The distillation objectives: MSC along the student's own trajectory, and single-step CFG distillation."""

from __future__ import annotations

import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.methods.sun import CFGTeacher, DistillationConfig, SUNAdapter, SUNDistillation, dpm_solver
from xa_lightning.methods.sun.msc import _noise_coefficient

from .conftest import text_states


def _setup(backbone, unet, objective="msc", alpha_init=0.0, **config):
    adapter = SUNAdapter.from_unet(unet, alpha_init=alpha_init)
    adapter.install(unet)
    teacher = CFGTeacher(unet, backbone.scheduler_config, adapter, num_steps=25, guidance_scale=5.0)
    config.setdefault("teacher_substeps", 1)
    distillation = SUNDistillation(
        DistillationConfig(objective=objective, **config), teacher, backbone.scheduler_config
    )
    student = lambda x, t, states: unet(x, t, encoder_hidden_states=states).sample
    return adapter, teacher, distillation, student


def _batch(backbone):
    with torch.no_grad():
        latents = backbone.encode_images(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    positive, negative = text_states(
        backbone, ["a red house by a lake", "a bowl of fruit"], ["blurry, watermark", "low quality, deformed"]
    )
    return latents, positive, negative, torch.tensor([4.0, 7.5])


def test_teacher_plan_lands_on_the_student_grid(backbone):
    teacher = CFGTeacher(backbone.denoiser, backbone.scheduler_config, num_steps=25)
    distillation = SUNDistillation(DistillationConfig(), teacher, backbone.scheduler_config)
    assert distillation.student_grid == [999, 749, 499, 249]
    assert distillation.substeps == 6  # round(25 / 4)
    plan = distillation.teacher_plan()
    for (steps, land_on), start, end in zip(plan, [999, 749, 499, 249], [749, 499, 249, None]):
        assert steps[0] == start and land_on == end
        assert all(a > b for a, b in zip(steps, steps[1:]))
        assert (len(steps) - 1 if end is not None else len(steps)) == 6
        if end is not None:
            assert steps[-1] == end


def test_msc_calls_student_once_and_teacher_substeps_per_student_step(backbone, unet):
    adapter, teacher, distillation, student = _setup(backbone, unet, teacher_substeps=2)
    latents, positive, negative, scales = _batch(backbone)
    batches = []
    hook = unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    loss, logs = distillation(student, latents, positive, negative, scales, torch.Generator().manual_seed(0))
    hook.remove()
    # per student step: 1 student call (batch B), then 2 teacher sub-steps (CFG: batch 2B)
    assert batches == [2, 4, 4] * 4
    assert set(logs) == {"msc_step0", "msc_step1", "msc_step2", "msc_step3"}
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("objective", ["msc", "cfg_eps"])
def test_loss_falls_on_a_fixed_batch_and_only_sun_gets_gradients(backbone, unet, objective):
    adapter, teacher, distillation, student = _setup(backbone, unet, objective=objective, space="eps")
    latents, positive, negative, scales = _batch(backbone)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=3e-2)  # from the identity start (alpha 0)
    losses = []
    for step in range(5):
        loss, _ = distillation(student, latents, positive, negative, scales, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is None for p in backbone.parameters())
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
            assert sum(float(p.grad.abs().sum()) for p in adapter.parameters()) > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_student_step_is_the_inference_solver_step(backbone, unet):
    """The student's step in training is the DPM-Solver++ update the 4-step pipeline takes."""
    adapter, teacher, distillation, student = _setup(backbone, unet, start_from="noise")
    latents, positive, negative, scales = _batch(backbone)
    from xa_lightning.methods.sun import concat_negative

    states = concat_negative(positive, negative)
    outputs = []
    recorder = unet.register_forward_hook(lambda m, args, out: outputs.append(out.sample.detach()))
    with torch.no_grad():
        distillation(student, latents, positive, negative, scales, torch.Generator().manual_seed(3))
    recorder.remove()
    student_outputs = [o for o in outputs if o.shape[0] == 2]
    # replay the pipeline's scheduler from the same noise
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    solver = dpm_solver(backbone.scheduler_config)
    solver.set_timesteps(4)
    x = noise * solver.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(solver.timesteps):
            eps = unet(x, t, encoder_hidden_states=states).sample
            torch.testing.assert_close(eps, student_outputs[i], rtol=1e-4, atol=1e-5)
            x = solver.step(eps, t, x).prev_sample


def test_eps_space_weight_is_the_solver_noise_coefficient(backbone):
    """d x_next / d eps of a real first-order DPM-Solver++ step equals the coefficient used for weighting."""
    solver = dpm_solver(backbone.scheduler_config, solver_order=1)
    solver.set_timesteps(timesteps=[749, 499])
    x = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    base = solver.step(eps, 749, x).prev_sample
    solver.set_timesteps(timesteps=[749, 499])
    moved = solver.step(eps + 1.0, 749, x).prev_sample
    measured = float((moved - base).mean())
    expected = _noise_coefficient(solver.alphas_cumprod.float(), 749, 499)
    assert abs(abs(measured) - abs(expected)) < 1e-4 * max(1.0, abs(expected))


@pytest.mark.parametrize(
    "bad",
    [{"objective": "dmd"}, {"space": "v"}, {"student_steps": 0}, {"step_weights": [1, 2]}, {"teacher_substeps": 0}],
)
def test_bad_options_are_user_errors(bad):
    with pytest.raises(UserError, match="method.distillation"):
        DistillationConfig(**bad)


def _gradients(adapter) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in adapter.parameters()])


@pytest.mark.parametrize("detach_history", [True, False])
def test_checkpointed_student_steps_give_the_single_backward_gradients(backbone, unet, detach_history):
    """Recomputing each student step in backward (one step's activations alive) changes no gradient."""
    adapter, teacher, distillation, student = _setup(
        backbone, unet, space="eps", detach_history=detach_history, alpha_init=1.0
    )
    latents, positive, negative, scales = _batch(backbone)
    results = {}
    for checkpointed in (False, True):
        distillation.config.checkpoint_student = checkpointed
        adapter.zero_grad(set_to_none=True)
        calls: list[bool] = []
        hook = unet.register_forward_pre_hook(lambda m, args, calls=calls: calls.append(torch.is_grad_enabled()))
        loss, _ = distillation(student, latents, positive, negative, scales, torch.Generator().manual_seed(0))
        loss.backward()
        hook.remove()
        results[checkpointed] = (loss.detach(), _gradients(adapter), calls.count(True))
    assert torch.equal(results[False][0], results[True][0])
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    assert results[False][1].abs().sum() > 0
    assert results[False][2] == 4 and results[True][2] == 8  # each student step recomputed once in backward


def test_weighted_objective_is_cfg_distillation_plus_lambda_msc(backbone, unet):
    losses = {}
    for objective in ("cfg_eps", "msc", "weighted"):
        _, _, distillation, student = _setup(backbone, unet, objective=objective, msc_weight=0.3)
        latents, positive, negative, scales = _batch(backbone)
        with torch.no_grad():
            losses[objective] = distillation(
                student, latents, positive, negative, scales, torch.Generator().manual_seed(5)
            )
    weighted, logs = losses["weighted"]
    torch.testing.assert_close(weighted, losses["cfg_eps"][0] + 0.3 * losses["msc"][0], rtol=1e-6, atol=0)
    assert {"cfg_eps", "msc", "msc_step0"} <= set(logs)
    with pytest.raises(UserError, match="msc_weight"):
        DistillationConfig(objective="weighted", msc_weight=-1.0)
