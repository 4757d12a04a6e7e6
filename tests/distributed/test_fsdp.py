"""trainer=fsdp (``FrozenFSDPStrategy``) on two CPU ranks (gloo, forked): the frozen backbones are sharded block by
block, and training is the DDP run's: the same adapter after the same steps, the same adapter-only checkpoint and
export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file

from xa_lightning.backbones import Backbone, build_backbone
from xa_lightning.distributed import FrozenFSDPStrategy, shardable_blocks
from xa_lightning.errors import UserError
from xa_lightning.training import AdapterExport, AtomicCheckpointIO, safe_torch_load

from .two_ranks import fit_on_two_ranks


class ShardRecorder(L.Callback):
    """Each rank: how much of each frozen model it holds, its losses; rank 0 also saves a checkpoint."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        held = {}
        for name, backbone in pl_module.named_modules():
            if isinstance(backbone, Backbone):
                params = list(backbone.denoiser.parameters())
                local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
                layers = [
                    p for encoder in backbone.text_encoders for b in shardable_blocks(encoder) for p in b.parameters()
                ]
                held[name] = {
                    "denoiser": local / sum(p.numel() for p in params),
                    "text_layer_params": len(layers),
                    "sharded_text_layer_params": sum(hasattr(p, "to_local") for p in layers),
                }
        sharded_adapter = any(hasattr(p, "to_local") for p in pl_module.adapter.parameters())
        record = {
            "held": held,
            "losses": self.losses,
            "adapter_sharded": sharded_adapter,
            "frozen_broadcast": getattr(trainer.strategy, "frozen_broadcast", None),  # VAE etc.: fingerprinted
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        trainer.save_checkpoint(self.out / "last.ckpt")  # every rank calls it; rank 0 writes


def fit(strategy, out: Path, experiment: str = "demo/x_adapter") -> list[dict]:
    callbacks = [ShardRecorder(out), AdapterExport(str(out / "adapter"))]
    return fit_on_two_ranks(strategy, out, experiment, callbacks, plugins=[AtomicCheckpointIO()])


@pytest.mark.slow
def test_sharded_backbones_train_the_adapter_as_ddp_does(tmp_path):
    ddp = fit(DDPStrategy(start_method="fork"), tmp_path / "ddp")
    fsdp = fit(FrozenFSDPStrategy(start_method="fork"), tmp_path / "fsdp")

    for rank in (0, 1):
        assert set(fsdp[rank]["held"]) == {"base", "upgraded"}
        assert all(held["text_layer_params"] > 0 for held in fsdp[rank]["held"].values())
        for name, held in fsdp[rank]["held"].items():
            assert held["denoiser"] < 0.6, f"rank {rank} holds {held['denoiser']:.0%} of the {name} denoiser"
            assert held["sharded_text_layer_params"] == held["text_layer_params"], f"rank {rank}, {name}: {held}"
        for held in ddp[rank]["held"].values():
            assert held["denoiser"] == 1 and held["sharded_text_layer_params"] == 0
        assert not fsdp[rank]["adapter_sharded"]
        assert fsdp[rank]["frozen_broadcast"] == []  # the unsharded frozen parts are equal: nothing re-sent
        assert fsdp[rank]["losses"] == pytest.approx(ddp[rank]["losses"], rel=1e-5, abs=1e-7)
    assert fsdp[0]["losses"] != fsdp[1]["losses"]  # each rank its own data
    checkpoint = safe_torch_load(tmp_path / "fsdp" / "last.ckpt")
    assert checkpoint["state_dict"] and all(key.startswith("adapter.") for key in checkpoint["state_dict"])
    reference = safe_torch_load(tmp_path / "ddp" / "last.ckpt")["state_dict"]
    torch.testing.assert_close(checkpoint["state_dict"], reference, rtol=1e-5, atol=1e-6)
    exported = load_file(tmp_path / "fsdp" / "adapter" / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(
        exported, load_file(tmp_path / "ddp" / "adapter" / "diffusion_pytorch_model.safetensors")
    )


def test_the_shard_units_are_the_denoiser_blocks_and_text_encoder_layers():
    sd15 = build_backbone("sd15", "tiny")
    unet = sd15.denoiser
    assert shardable_blocks(unet) == [*unet.down_blocks, *unet.up_blocks, unet.mid_block]
    clip = sd15.text_encoders[0]
    assert shardable_blocks(clip) == list(clip.get_submodule("encoder.layers")) and len(shardable_blocks(clip)) > 1
    sdxl_encoders = build_backbone("sdxl", "tiny").text_encoders
    assert all(len(shardable_blocks(encoder)) > 1 for encoder in sdxl_encoders)
    pixart = build_backbone("pixart_alpha", "tiny")
    assert shardable_blocks(pixart.denoiser) == list(pixart.denoiser.transformer_blocks)
    t5 = pixart.text_encoders[0]
    assert shardable_blocks(t5) == list(t5.encoder.block) and len(shardable_blocks(t5)) > 1


def test_uneven_evaluation_batches_are_refused_before_training():
    from xa_lightning.callbacks.evaluation import EvaluationCallback
    from xa_lightning.distributed import _check_evaluation_batches

    class Trainer:
        callbacks = [EvaluationCallback({"num_images": 6, "batch_size": 1})]

    _check_evaluation_batches(Trainer(), 3)
    with pytest.raises(UserError, match=r"eval\.num_images=6 gives the 4 ranks different numbers of batches"):
        _check_evaluation_batches(Trainer(), 4)
