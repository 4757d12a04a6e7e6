"""The LightningModule every method builds on: frozen backbones + one trainable adapter."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from xa_lightning.errors import UserError
from xa_lightning.runtime import gather_per_rank, own_part
from xa_lightning.training.rng import capture_rng, restore_rng
from xa_lightning.weights import read_state_dict

# sampler(prompts, seeds, references) -> uint8 images (B, 3, H, W)
Sampler = Callable[[list[str], list[int], torch.Tensor | None], torch.Tensor]

ADAPTER_PREFIX = "adapter."
ADAPTER_META_FILE = "xa_adapter.json"


class AdapterModule(L.LightningModule):
    """Base class of the methods' LightningModules.

    Subclasses register their frozen models with :meth:`add_backbone`, set ``self.adapter`` (a
    diffusers-style ``ModelMixin, ConfigMixin`` model, the only trainable state) and implement
    :meth:`compute_loss` and :meth:`evaluation_samplers`.

    Checkpoints hold only the adapter's state (plus optimizer/loop state from Lightning) and a record of
    the method and backbones, so a checkpoint of another method or backbone is refused with a clear
    message instead of half-loading. They also hold every rank's random generators (torch CPU / CUDA,
    numpy, python and :meth:`rng_generators`), restored when training resumes (``on_train_start``:
    subclasses that override it call ``super().on_train_start()``), and never a non-finite weight.
    """

    method: ClassVar[str] = ""

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        self._backbone_names: list[str] = []
        self.adapter: nn.Module | None = None
        # Samples processed over all ranks: A4A plots against it; survives resume via the checkpoint.
        self.samples_seen = 0
        # Set by the CLI: the composed run config, stored in checkpoints so xa-eval / xa-sample can rebuild.
        self.run_config: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ backbones
    def add_backbone(self, name: str, backbone: nn.Module) -> nn.Module:
        """Register a frozen model as a submodule (moves with the module, never trains, never saved)."""
        backbone.requires_grad_(False)
        backbone.eval()
        self.add_module(name, backbone)
        self._backbone_names.append(name)
        return backbone

    def backbone_ids(self) -> dict[str, str]:
        return {
            name: str(getattr(getattr(self, name), "id", type(getattr(self, name)).__name__))
            for name in self._backbone_names
        }

    def train(self, mode: bool = True) -> AdapterModule:
        super().train(mode)
        for name in self._backbone_names:  # frozen parts stay in eval (dropout off, norms fixed)
            getattr(self, name).eval()
        return self

    # ------------------------------------------------------------------ what subclasses provide
    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def evaluation_samplers(self) -> OrderedDict[str, Sampler]:
        """Name -> sampler; the first is the method itself, the others are its baselines."""
        raise NotImplementedError

    def adapted_prediction(self, batch: Mapping[str, Any], strength: float, seed: int = 0) -> torch.Tensor:
        """The prediction of the model the adapter changes, on one training batch, with the adapter's effect
        scaled by ``strength`` (0: none, 1: as trained); noise and timesteps drawn from ``seed``.

        Every method implements it and :meth:`frozen_prediction`: the conformance suite (tests/conformance)
        requires ``strength=0`` to equal the frozen model bit for bit, and a changed adapter to change it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement adapted_prediction")

    def frozen_prediction(self, batch: Mapping[str, Any], seed: int = 0) -> torch.Tensor:
        """The same prediction as :meth:`adapted_prediction` by the frozen model alone (nothing of the method
        installed or applied), from the same noise, timesteps and conditioning."""
        raise NotImplementedError(f"{type(self).__name__} does not implement frozen_prediction")

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-group learning rates."""
        return [{"params": [p for p in self.adapter.parameters() if p.requires_grad], "name": "adapter"}]

    def rng_generators(self) -> dict[str, torch.Generator]:
        """Generators the method draws training randomness from besides the global ones (name -> generator);
        checkpoints save and restore their states. Override when the method owns any."""
        return {}

    # ------------------------------------------------------------------ training loop
    @staticmethod
    def batch_size_of(batch: Mapping[str, Any]) -> int:
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
            if isinstance(value, (list, tuple)):
                return len(value)
        raise ValueError("cannot infer the batch size of an empty batch")

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs = self.compute_loss(batch)
        batch_size = self.batch_size_of(batch)
        self.samples_seen += batch_size * self.trainer.world_size
        # Averaged over the ranks (every rank logs the same keys): the logged curve and the summary line are
        # the run's, not whichever rank wrote last. samples_seen is already the total over the ranks.
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("train/samples_seen", float(self.samples_seen), batch_size=batch_size)
        for key, value in logs.items():
            self.log(f"train/{key}", value, batch_size=batch_size, sync_dist=True)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss, _ = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=self.batch_size_of(batch), sync_dist=True)

    def configure_optimizers(self) -> Any:
        if self._optimizer_factory is None:
            raise UserError(
                "method.optimizer is not set; add e.g. optimizer: {_target_: torch.optim.AdamW, "
                "_partial_: true, lr: 1e-4} to the method config"
            )
        optimizer = self._optimizer_factory(self.param_groups())
        if self._scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._scheduler_factory(optimizer), "interval": "step"},
        }

    # ------------------------------------------------------------------ checkpoints: trainable state only
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        if self.adapter is None:
            raise RuntimeError(f"{type(self).__name__} did not set self.adapter")
        adapter_state = self.adapter.state_dict(prefix=prefix + ADAPTER_PREFIX, keep_vars=keep_vars)
        if destination is None:
            return adapter_state
        destination.update(adapter_state)
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        foreign = [k for k in state_dict if not k.startswith(ADAPTER_PREFIX)]
        if foreign:
            raise UserError(
                f"checkpoint holds keys outside the adapter (e.g. {foreign[0]!r}); "
                "it was not written by xa-lightning's AdapterModule"
            )
        adapter_state = {k[len(ADAPTER_PREFIX) :]: v for k, v in state_dict.items()}
        return self.adapter.load_state_dict(adapter_state, strict=strict, assign=assign)

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "backbones": self.backbone_ids(),
            "adapter_class": f"{type(self.adapter).__module__}:{type(self.adapter).__qualname__}",
            "adapter_config": _plain(dict(getattr(self.adapter, "config", {}) or {})),
            "samples_seen": self.samples_seen,
            "config": self.run_config,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite(checkpoint.get("state_dict", {}), what="checkpoint")
        checkpoint["xa"] = self.checkpoint_metadata()
        checkpoint["xa_rng"] = gather_per_rank(capture_rng(self.rng_generators()))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_compatible(checkpoint.get("xa"), source="checkpoint")
        self.samples_seen = int(checkpoint["xa"].get("samples_seen", 0))
        self._rng_to_restore = own_part(checkpoint.get("xa_rng"), "the random generators' state")

    def on_train_start(self) -> None:
        # As late as possible: whatever setup drew from the generators after the checkpoint was loaded
        # (callbacks, loader creation) must not shift the training steps' draws.
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore, self.rng_generators())
            self._rng_to_restore = None

    def check_finite(self, state: Mapping[str, Any], what: str) -> None:
        """Refuse to write non-finite weights (a diverged run must not overwrite a good checkpoint)."""
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                step = getattr(getattr(self, "_trainer", None), "global_step", "?")
                raise UserError(
                    f"the adapter's weights are not finite at step {step} ({key}); the {what} is not written "
                    "and the previous one is kept; resume from it with a lower method.optimizer.lr"
                )

    def check_compatible(self, meta: Mapping[str, Any] | None, source: str) -> None:
        """Refuse state written for another method or other backbones (one clear line)."""
        if not meta or "method" not in meta:
            raise UserError(f"{source} has no xa-lightning metadata; it was not written by xa-train")
        if meta["method"] != self.method:
            raise UserError(
                f"{source} is for method {meta['method']!r}, not {self.method!r}; "
                f"use method={meta['method']} or a {self.method} checkpoint"
            )
        mine = self.backbone_ids()
        theirs = dict(meta.get("backbones") or {})
        if theirs != mine:
            raise UserError(
                f"{source} was trained on backbones {theirs}, this run uses {mine}; "
                "set the backbone config to match the checkpoint"
            )

    # ------------------------------------------------------------------ adapter export
    def export_adapter(self, directory: str | Path) -> Path:
        """Write the adapter as ``save_pretrained`` safetensors plus our metadata file."""
        directory = Path(directory)
        self.check_finite(self.adapter.state_dict(), what="adapter export")
        self.adapter.save_pretrained(directory, safe_serialization=True)
        meta = {k: v for k, v in self.checkpoint_metadata().items() if k != "config"}
        (directory / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    def load_adapter(self, directory: str | Path) -> None:
        """Load an exported adapter (safetensors only: loading executes no code)."""
        directory = Path(directory)
        meta_file = directory / ADAPTER_META_FILE
        if not meta_file.is_file():
            raise UserError(f"{directory} is not an exported xa-lightning adapter ({ADAPTER_META_FILE} missing)")
        self.check_compatible(json.loads(meta_file.read_text()), source=str(directory))
        weights = sorted(directory.glob("*.safetensors"))
        if not weights:
            raise UserError(f"{directory} holds no .safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for file in weights:
            state.update(read_state_dict(file, "adapter weights", fix=f"re-export the adapter into {directory}"))
        self.adapter.load_state_dict(state, strict=True)


def _plain(value: Any) -> Any:
    """Config values as plain Python (tuples -> lists) so they survive ``weights_only`` loading and JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
