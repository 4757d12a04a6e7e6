"""The CFG teacher: guidance with the sampled negative prompt, exactly the frozen model, the prompt list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.methods.sun import CFGTeacher, NegativePromptBank, SUNModule

from .conftest import random_adapter, text_states

REPO = Path(__file__).resolve().parents[2]


def test_guided_output_is_cfg_of_the_frozen_model_in_one_call(backbone, unet):
    adapter = random_adapter(unet)
    adapter.install(unet)  # the teacher shares the UNet with SUN and must not see it
    teacher = CFGTeacher(unet, backbone.scheduler_config, adapter)
    positive, negative = text_states(backbone, ["a castle", "a boat"], ["blurry", "ugly, text"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scales = torch.tensor([3.0, 8.0])
    calls = []
    hook = unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    guided = teacher.guided_output(x, 600, positive, negative, scales)
    hook.remove()
    assert calls == [4]
    adapter.uninstall(unet)
    with torch.no_grad():
        conditional = unet(x, 600, encoder_hidden_states=positive).sample
        unconditional = unet(x, 600, encoder_hidden_states=negative).sample
    expected = unconditional + scales.view(-1, 1, 1, 1) * (conditional - unconditional)
    torch.testing.assert_close(guided, expected, rtol=1e-3, atol=3e-4)  # batch 4 vs 2: float summation order x scale 8


def test_teacher_runs_cfg_with_the_sampled_negative_prompt(tmp_path, monkeypatch):
    negatives = ["zzz grainy photo", "qqq extra fingers", "www watermark text"]
    prompt_file = tmp_path / "negatives.txt"
    prompt_file.write_text("# my list\n" + "\n".join(negatives) + "\n\n")
    module = SUNModule(
        backbone={"family": "sd15", "flavour": "tiny"},
        teacher={
            "negative_prompts": str(prompt_file),
            "empty_negative_probability": 0.0,
            "guidance_scale_range": [2.0, 9.0],
        },
        distillation={"teacher_substeps": 1},
    )
    drawn: list[list[str]] = []
    sample = module.negative_prompts.sample

    def recording_sample(count, generator=None):
        drawn.append(sample(count, generator))
        return drawn[-1]

    monkeypatch.setattr(module.negative_prompts, "sample", recording_sample)
    teacher_states = []

    def record(mod, args, kwargs, out):
        if args[0].shape[0] == 4:  # the doubled CFG batch
            teacher_states.append(kwargs["encoder_hidden_states"].detach().clone())

    unet = module.backbone.denoiser
    hook = unet.register_forward_hook(record, with_kwargs=True)
    captions = ["a small house", "a green field"]
    torch.manual_seed(0)
    loss, logs = module.compute_loss({"pixels": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": captions})
    hook.remove()
    assert len(drawn) == 1 and all(p in negatives for p in drawn[0])
    assert len(teacher_states) == 4  # one CFG call per student interval (1 sub-step each)
    expected_negative = module.backbone.encode_text(drawn[0]).prompt_embeds
    expected_prompt = module.backbone.encode_text(captions).prompt_embeds
    for states in teacher_states:
        torch.testing.assert_close(states[:2], expected_negative)
        torch.testing.assert_close(states[2:], expected_prompt)
    assert 2.0 <= float(logs["guidance_scale"]) <= 9.0 and torch.isfinite(loss)


def test_project_negative_prompt_list():
    bank = NegativePromptBank(REPO / "evaluation" / "negative_prompts.txt")
    assert len(bank) >= 200
    assert len(set(bank.prompts)) == len(bank.prompts)
    assert not any(p.startswith("#") for p in bank.prompts)


def test_negative_prompt_sampling(tmp_path):
    bank = NegativePromptBank(prompts=["a", "b", "c"])
    first = bank.sample(64, torch.Generator().manual_seed(1))
    assert first == bank.sample(64, torch.Generator().manual_seed(1))
    assert set(first) == {"a", "b", "c"}
    assert NegativePromptBank(prompts=["a"], empty_probability=1.0).sample(5) == [""] * 5


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n", b"\xff\xfe\x00bad"])
def test_bad_negative_prompt_files_are_user_errors(tmp_path, content):
    path = tmp_path / "negatives.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match="negative"):
        NegativePromptBank(path)


def test_bad_guidance_range_is_a_user_error(backbone):
    with pytest.raises(UserError, match="guidance_scale_range"):
        CFGTeacher(backbone.denoiser, backbone.scheduler_config, guidance_scale_range=[5.0, 2.0])


def test_half_precision_backbone_with_fp32_adapter(tmp_path):
    """The frozen model in bf16 (as on GPUs), the adapter trained in fp32: teacher, student and loss agree on dtypes."""
    module = SUNModule(
        backbone={"family": "sd15", "flavour": "tiny", "dtype": "bf16"},
        teacher={"negative_prompts": str(REPO / "evaluation" / "negative_prompts.txt")},
        distillation={"teacher_substeps": 1},
    )
    assert module.backbone.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.adapter.parameters())
    loss, _ = module.compute_loss({"pixels": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": ["a cat", "a dog"]})
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.adapter.parameters())
    assert all(p.grad is None for p in module.backbone.parameters())
