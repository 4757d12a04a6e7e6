"""SUN's evaluation samplers and the pipeline glue behind them (mixed into :class:`SUNModule`).

``sun`` (the student: 4 steps, no CFG), ``teacher`` (the frozen model: 25-step DPM-Solver++ with CFG, same
prompts, seeds and negative prompt), then ``sun_<name>`` / ``teacher_<name>`` for every fine-tuned UNet in
``sampling.plugin_unets`` (the adapter plugged in without retraining, and that UNet's own CFG sampling), and
``lcm_lora`` when ``sampling.lcm_lora`` names an LCM-LoRA (the few-step baseline: LCMScheduler, the LoRA on
the frozen UNet, SUN off; the LoRA is switched off again after sampling, so training never sees it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from xa_lightning.errors import UserError
from xa_lightning.methods.sun.pipeline import SUNPipeline
from xa_lightning.methods.sun.teacher import dpm_solver
from xa_lightning.training import Sampler
from xa_lightning.training.utils import generators, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from xa_lightning.backbones import Backbone
    from xa_lightning.methods.sun.adapter import SUNAdapter
    from xa_lightning.methods.sun.config import SamplingOptions, TeacherOptions


class SUNSampling:
    """The samplers of :class:`~xa_lightning.methods.sun.lit_module.SUNModule`.

    Reads the module's ``backbone``, ``adapter``, ``sampling`` and ``teacher_options``.
    """

    backbone: Backbone
    adapter: SUNAdapter
    sampling: SamplingOptions
    teacher_options: TeacherOptions

    def _generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], **kwargs: Any) -> torch.Tensor:
        resolution = self.backbone.resolution
        with torch.no_grad():
            images = pipe(
                list(prompts),
                negative_prompt=[self.sampling.negative_prompt] * len(prompts),
                generator=generators(seeds),
                height=resolution,
                width=resolution,
                output_type="pt",
                **kwargs,
            ).images
        return to_uint8(images)

    def _sun(self, pipe: Any) -> SUNPipeline:
        """``pipe`` with this adapter: DPM-Solver++ trailing, ``sampling.steps`` steps, no CFG."""
        sun = SUNPipeline(pipe, self.adapter, num_inference_steps=self.sampling.steps)
        sun.set_progress_bar_config(disable=not self.sampling.progress)
        return sun

    def _teacher(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """The frozen model behind ``pipe`` with CFG and the teacher's steps (SUN switched off)."""
        pipe.set_progress_bar_config(disable=not self.sampling.progress)
        with self.adapter.disabled():
            return self._generate(
                pipe,
                prompts,
                seeds,
                guidance_scale=self.teacher_options.guidance_scale,
                num_inference_steps=self.teacher_options.num_steps,
            )

    def sun_pipeline(self) -> SUNPipeline:
        """The backbone's diffusers pipeline with SUN: 4 steps, DPM-Solver++ trailing, no CFG."""
        return self._sun(self.backbone.pipeline())

    def teacher_pipeline(self) -> Any:
        """The frozen model's pipeline: DPM-Solver++ with the teacher's steps (use with CFG)."""
        pipe = self.backbone.pipeline(scheduler=dpm_solver(self.backbone.scheduler_config))
        pipe.set_progress_bar_config(disable=not self.sampling.progress)
        return pipe

    def sample_sun(self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
        return self._generate(self.sun_pipeline(), prompts, seeds)

    def sample_teacher(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._teacher(self.teacher_pipeline(), prompts, seeds)

    def plugin_unet(self, name: str) -> torch.nn.Module:
        """A fine-tuned UNet from ``sampling.plugin_unets`` (loaded once, frozen, never checkpointed)."""
        cache = self.__dict__.setdefault("_plugin_cache", {})
        backbone = self.backbone
        if name not in cache:
            from diffusers import UNet2DConditionModel

            source = self.sampling.plugin_unets[name]
            if Path(source).is_file():
                raise UserError(
                    f"method.sampling.plugin_unets.{name}={source} is a single-file checkpoint; convert it to the "
                    "diffusers layout first (StableDiffusionPipeline.from_single_file(...).save_pretrained(dir))"
                )
            subfolder = "unet" if (Path(source) / "unet").is_dir() or not Path(source).exists() else None
            try:
                unet = UNet2DConditionModel.from_pretrained(source, subfolder=subfolder, torch_dtype=backbone.dtype)
            except (OSError, ValueError) as error:
                raise UserError(
                    f"method.sampling.plugin_unets.{name}={source}: cannot load a UNet from it "
                    f"({type(error).__name__}); give a diffusers UNet or pipeline directory / hub id"
                ) from error
            cache[name] = unet.requires_grad_(False).eval()
        unet = cache[name].to(backbone.device)
        self.adapter.check_compatible(unet)
        return unet

    def _plugin_pipeline(self, name: str, scheduler: Any = None) -> Any:
        import diffusers

        base = self.backbone.pipeline(scheduler=scheduler)
        return diffusers.StableDiffusionPipeline(
            **{**base.components, "unet": self.plugin_unet(name)}, requires_safety_checker=False
        )

    def _plugin_samplers(self, name: str) -> dict[str, Sampler]:
        def sun(prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
            return self._generate(self._sun(self._plugin_pipeline(name)), prompts, seeds)

        def teacher(prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
            scheduler = dpm_solver(self.backbone.scheduler_config)
            return self._teacher(self._plugin_pipeline(name, scheduler=scheduler), prompts, seeds)

        return {f"sun_{name}": sun, f"teacher_{name}": teacher}

    def _lcm_lora_pipeline(self) -> Any:
        """The backbone's pipeline with LCMScheduler and the LCM-LoRA loaded into its UNet (once; off after)."""
        from diffusers import LCMScheduler

        from xa_lightning.plugins import load_lora

        pipe = self.backbone.pipeline(scheduler=LCMScheduler.from_config(self.backbone.scheduler_config))
        pipe.set_progress_bar_config(disable=not self.sampling.progress)
        if not self.__dict__.get("_lcm_lora_loaded"):
            load_lora(pipe, self.sampling.lcm_lora, "lcm_lora")
            self.backbone.requires_grad_(False)  # peft adds the LoRA weights as trainable parameters
            self.__dict__["_lcm_lora_loaded"] = True
        return pipe

    def sample_lcm_lora(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Baseline: LCM-LoRA on the frozen UNet, ``sampling.steps`` LCM steps (SUN switched off)."""
        pipe = self._lcm_lora_pipeline()
        pipe.enable_lora()
        try:
            with self.adapter.disabled():
                return self._generate(
                    pipe,
                    prompts,
                    seeds,
                    num_inference_steps=self.sampling.steps,
                    guidance_scale=self.sampling.lcm_lora_guidance_scale,
                )
        finally:
            pipe.disable_lora()  # UNet and text encoder: training and the other samplers see the plain model

    def evaluation_samplers(self) -> OrderedDict[str, Sampler]:
        """``sun``: the student (4 steps, no CFG); ``teacher``: 25-step DPM-Solver++ with CFG, same seeds;
        then ``sun_<name>`` / ``teacher_<name>`` for every fine-tuned UNet in ``sampling.plugin_unets``, and
        ``lcm_lora`` with ``sampling.lcm_lora``."""
        samplers: OrderedDict[str, Sampler] = OrderedDict(sun=self.sample_sun, teacher=self.sample_teacher)
        for name in self.sampling.plugin_unets:
            samplers.update(self._plugin_samplers(name))
        if self.sampling.lcm_lora is not None:
            samplers["lcm_lora"] = self.sample_lcm_lora
        return samplers
