"""A minimal real method for testing the shared training plumbing.

``ResidualEpsModule`` trains a small zero-initialised convolutional head that corrects a frozen tiny
SD1.5 UNet's noise prediction: real backbone, real diffusers-style adapter, real Lightning loop. The
thing under test in this folder is the plumbing (checkpoints, resume, export, configs), not the method.
"""

from __future__ import annotations

import functools

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xa_lightning.backbones import build_backbone
from xa_lightning.training import AdapterModule


class EpsCorrection(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, channels, 3, padding=1)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@functools.cache
def tiny_backbone(family: str = "sd15", seed: int = 0):
    return build_backbone(family, "tiny", seed=seed)


class ResidualEpsModule(AdapterModule):
    method = "residual_eps_test"

    def __init__(self, optimizer=None, backbone_seed: int = 0, hidden: int = 16, family: str = "sd15") -> None:
        super().__init__(optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=1e-2))
        self.backbone = self.add_backbone("backbone", tiny_backbone(family, backbone_seed))
        torch.manual_seed(0)  # the backbone cache must not change the adapter's initialisation
        self.adapter = EpsCorrection(channels=4, hidden=hidden)

    def compute_loss(self, batch):
        latents = batch["latents"]
        noise = batch["noise"]
        t = batch["timesteps"]
        noisy = self.backbone.noise_scheduler.add_noise(latents, noise, t)
        cond = self.backbone.encode_text(list(batch["caption"]))
        with torch.no_grad():
            eps = self.backbone.predict(noisy, t, cond)
        pred = eps + self.adapter(noisy)
        loss = torch.nn.functional.mse_loss(pred, noise)
        return loss, {"eps_mse": loss.detach()}

    def evaluation_samplers(self):
        return {}


class FixedLatents(Dataset):
    """Deterministic latents/noise/timesteps: resume-vs-uninterrupted must see identical batches."""

    def __init__(self, n: int = 8, size: int = 8) -> None:
        g = torch.Generator().manual_seed(123)
        self.latents = torch.randn(n, 4, size, size, generator=g)
        self.noise = torch.randn(n, 4, size, size, generator=g)
        self.timesteps = torch.randint(0, 1000, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {
            "latents": self.latents[i],
            "noise": self.noise[i],
            "timesteps": self.timesteps[i],
            "caption": f"a photo number {i}",
        }


def loader(batch_size: int = 2) -> DataLoader:
    return DataLoader(FixedLatents(), batch_size=batch_size, shuffle=False)
