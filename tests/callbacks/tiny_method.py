"""A method-under-test stand-in: a tiny real diffusers StableDiffusionPipeline + a trainable text adapter.

Built here (not from xa_lightning.backbones) so the callback tests depend only on diffusers. The
callback and the metrics are the real things under test; this module only has to train and sample.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def tiny_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):  # a character-level vocabulary: enough for any ASCII prompt
        vocab[chr(code)] = len(vocab)
        vocab[chr(code) + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return pipe


class LatentDataset(Dataset):
    def __init__(self, count: int = 8) -> None:
        generator = torch.Generator().manual_seed(123)
        self.latents = torch.randn(count, 4, 8, 8, generator=generator)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "caption": f"caption {index}"}


def loader(batch_size: int = 2) -> DataLoader:
    return DataLoader(LatentDataset(), batch_size=batch_size, shuffle=False)


class TinyTextAdapterModule(L.LightningModule):
    """Frozen tiny SD + a zero-initialised residual adapter on the text embeddings (the only trainable part).

    ``evaluation_samplers()`` returns the method (with adapter) first and the frozen pipeline as baseline.
    """

    def __init__(self, steps: int = 2, resolution: int = 32) -> None:
        super().__init__()
        self.pipe = tiny_pipeline()
        self.unet, self.vae, self.text_encoder = self.pipe.unet, self.pipe.vae, self.pipe.text_encoder
        self.adapter = torch.nn.Linear(32, 32)
        torch.nn.init.zeros_(self.adapter.weight)
        torch.nn.init.zeros_(self.adapter.bias)
        self.steps, self.resolution = steps, resolution
        self.sampler_calls: list[dict[str, Any]] = []
        self.training_steps = 0
        self.samples_seen = 0  # as AdapterModule counts it: the evaluation records it per evaluation

    def encode(self, prompts: list[str], use_adapter: bool = True) -> torch.Tensor:
        ids = self.pipe.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        embeds = self.text_encoder(ids)[0]
        return embeds + self.adapter(embeds) if use_adapter else embeds

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        latents = batch["latents"]
        self.samples_seen += latents.shape[0]
        noise = torch.randn_like(latents)  # global RNG: the evaluation must not shift it
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        noisy = self.pipe.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, self.encode(list(batch["caption"]))).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.adapter.parameters(), lr=1e-2)

    def _sampler(self, use_adapter: bool):
        def sample(prompts: list[str], seeds: list[int], references: torch.Tensor | None) -> torch.Tensor:
            self.sampler_calls.append(
                {
                    "training": self.training,
                    "grad": torch.is_grad_enabled(),
                    "seeds": list(seeds),
                    "references": references is not None,
                }
            )
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            images = self.pipe(
                prompt_embeds=self.encode(prompts, use_adapter),
                num_inference_steps=self.steps,
                guidance_scale=1.0,
                height=self.resolution,
                width=self.resolution,
                generator=generators,
                output_type="pt",
            ).images
            return (images * 255).round().clamp(0, 255).to(torch.uint8)

        return sample

    def evaluation_samplers(self) -> OrderedDict[str, Any]:
        return OrderedDict([("method", self._sampler(True)), ("baseline", self._sampler(False))])


class EvalDataModule(L.LightningDataModule):
    """Latent batches for training plus the evaluation hooks the data engineer's datamodules expose."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict[str, int] = {}

    def train_dataloader(self) -> DataLoader:
        return loader()

    def eval_prompts(self, n: int) -> list[str]:
        self.asked["prompts"] = n
        return [f"held-out caption {i}" for i in range(n)]

    def eval_references(self, n: int) -> torch.Tensor:
        self.asked["references"] = n
        return torch.rand(n, 3, 24, 24, generator=torch.Generator().manual_seed(5))

    def real_images(self, n: int) -> torch.Tensor:
        self.asked["real"] = n
        return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
