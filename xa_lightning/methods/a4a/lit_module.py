"""A4A training as a LightningModule: frozen upgraded model + the PTA's frozen image encoder, trainable A4A.

One training step::

    reference image -> PTA CLIP encoder -> features  (image dropout: the "no image" features)
    features -> PTA image projection -> c -> PTA per-layer W_k^i c, W_v^i c      (no base-model pass at all)
             -> Coupling Space Projection -> Upgraded Space Mapping -> Alignment -> k^_j, v^_j
    image -> upgraded VAE -> z ; t ~ U ; noise ; caption (text dropout: "") -> upgraded text encoder(s)
    upgraded denoiser(z_t, t, text) with Attn(q, text) + lambda Attn(q, k^_j, v^_j) in every cross-attention
    loss = MSE(prediction, noise or v)       trainable: the A4A modules (+ the PTA when finetune_pta)

The base model (SD1.5) is never called; it is only built when the ``pta_base`` baseline is wanted. The
``from_scratch`` variant (the paper's IP-Adapter*, Fig. 7) trains an IP-Adapter on the upgraded model's own
layers instead (image projection + per-layer to_k_ip / to_v_ip), with the same data, encoder and loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xa_lightning.backbones import Backbone, TextConditioning
from xa_lightning.config import coerce_options
from xa_lightning.errors import UserError
from xa_lightning.methods.a4a.attention import ImageInjection
from xa_lightning.methods.a4a.config import (
    UPGRADED_FAMILIES,
    VARIANTS,
    AdapterOptions,
    LearningRates,
    PTAOptions,
    SamplingOptions,
    TrainingOptions,
)
from xa_lightning.methods.a4a.modules import (
    A4AAdapter,
    image_keys_values,
    sd15_unet_structure,
    stand_in_image_encoder,
    uses_hidden_states,
)
from xa_lightning.methods.a4a.sampling import A4ASampling
from xa_lightning.plugins.ip_adapter import (
    ImageEncoder,
    IPAdapterLayout,
    IPAdapterModel,
    load_image_encoder,
    random_ip_adapter,
    read_ip_adapter,
)
from xa_lightning.training import AdapterModule
from xa_lightning.training.utils import seeded_noisy_latents

BASE_FAMILIES = ("sd15",)


def _spec(spec: Any) -> tuple[str | None, str | None]:
    """(family, flavour) of a backbone or its config, without building it."""
    if isinstance(spec, Backbone):
        return spec.family, spec.flavour
    if spec is None:
        return None, None
    values = dict(spec)
    return values.get("family"), values.get("flavour", "tiny")


def _build(spec: Any) -> Backbone:
    if isinstance(spec, Backbone):
        return spec
    from xa_lightning.backbones import backbone_from_config

    return backbone_from_config(spec)


class A4AModule(A4ASampling, AdapterModule):
    """A4A: transfers an SD1.5 IP-Adapter (the PTA) to an upgraded model (SDXL or PixArt-alpha).

    Only ``self.adapter`` trains: the :class:`A4AAdapter` (with the PTA inside when ``finetune_pta``), or, for
    ``variant="from_scratch"``, an :class:`IPAdapterModel` on the upgraded model's layers. The loss is here; the
    evaluation samplers come from :class:`A4ASampling`.

    Args:
        upgraded_backbone: the upgraded model (``Backbone`` or its config): sdxl or pixart_alpha.
        base_backbone: the base model (SD1.5) for the ``pta_base`` baseline only; None: no such baseline.
        variant: ``a4a`` | ``from_scratch``.
        pta / adapter / training / learning_rates / sampling: :class:`PTAOptions`, :class:`AdapterOptions`,
            :class:`TrainingOptions`, :class:`LearningRates`, :class:`SamplingOptions` (or mappings of them).
        optimizer / lr_scheduler: partials taking the parameter groups / the optimizer.
        name: the run name experiments give.
    """

    method = "a4a"

    def __init__(
        self,
        upgraded_backbone: Any = None,
        base_backbone: Any = None,
        variant: str = "a4a",
        pta: PTAOptions | Mapping[str, Any] | None = None,
        adapter: AdapterOptions | Mapping[str, Any] | None = None,
        training: TrainingOptions | Mapping[str, Any] | None = None,
        learning_rates: LearningRates | Mapping[str, Any] | None = None,
        sampling: SamplingOptions | Mapping[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        name: str = "a4a",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.run_name = name
        self.pta_options = coerce_options(pta, PTAOptions, "method.pta")
        self.adapter_options = coerce_options(adapter, AdapterOptions, "method.adapter")
        self.training_options = coerce_options(training, TrainingOptions, "method.training")
        self.learning_rates = coerce_options(learning_rates, LearningRates, "method.learning_rates")
        self.sampling = coerce_options(sampling, SamplingOptions, "method.sampling")
        if variant not in VARIANTS:
            raise UserError(f"method.variant={variant!r} is not one of {VARIANTS}")
        self.variant = variant
        self._check_before_loading(upgraded_backbone, base_backbone)

        upgraded = self.add_backbone("upgraded", _build(upgraded_backbone))
        wants_base = base_backbone is not None and self.sampling.pta_base  # only the pta_base baseline runs it
        self.base: Backbone | None = self.add_backbone("base", _build(base_backbone)) if wants_base else None
        self.injection = ImageInjection(upgraded.denoiser)
        self.pta_encoder = self.add_backbone("pta_encoder", self._image_encoder())
        self.pta_layout: IPAdapterLayout | None = None
        pta_model = None
        if variant == "a4a" or (self.base is not None and self.sampling.pta_base):
            self.pta_layout = self._pta_layout()
            pta_model = IPAdapterModel.from_layout(self.pta_layout)
        finetune = self.training_options.finetune_pta and variant == "a4a"
        self.adapter = self._build_adapter(pta_model if finetune else None, pta_model)
        # the frozen PTA: kept out of the adapter (never checkpointed), frozen, in eval mode
        self.frozen_pta: IPAdapterModel | None = None
        if pta_model is not None and not finetune:
            self.frozen_pta = pta_model.requires_grad_(False).eval()
        if self.adapter_options.init_weights:
            self.load_adapter(self.adapter_options.init_weights)
        self.injection.install()
        if self.training_options.gradient_checkpointing:
            upgraded.denoiser.enable_gradient_checkpointing()
        self._empty_text: TextConditioning | None = None

    # ------------------------------------------------------------------ construction
    def _check_before_loading(self, upgraded_spec: Any, base_spec: Any) -> None:
        """Everything a config can get wrong, before gigabytes of weights are read."""
        family, flavour = _spec(upgraded_spec)
        if upgraded_spec is None:
            raise UserError("method.upgraded_backbone is not set; give it a backbone config (sdxl or pixart_alpha)")
        if family not in UPGRADED_FAMILIES:
            raise UserError(
                f"method.upgraded_backbone.family={family!r}: A4A transfers the PTA to {', '.join(UPGRADED_FAMILIES)}"
            )
        base_family, _ = _spec(base_spec)
        if base_spec is not None and base_family not in BASE_FAMILIES:
            raise UserError(f"method.base_backbone.family={base_family!r}: the PTA's base model is SD1.5 (sd15)")
        # random stand-ins only beside random backbones (tiny, full_shape): never a silent random PTA
        real = flavour == "pretrained"
        if self.sampling.pta_um:
            if family != "sdxl":
                raise UserError(
                    f"method.sampling.pta_um: the upgraded model's own IP-Adapter is an SDXL baseline, "
                    f"the upgraded model is {family}; set method.sampling.pta_um=false"
                )
            if real and not self.sampling.pta_um_weights:
                raise UserError(
                    "method.sampling.pta_um_weights is required for the PTA-UM baseline: set it to the path of the "
                    "published SDXL IP-Adapter (ip-adapter_sdxl.bin) or set IP_ADAPTER_SDXL"
                )
            if real and not self.sampling.pta_um_image_encoder:
                raise UserError(
                    "method.sampling.pta_um_image_encoder is required for the PTA-UM baseline: set it to the path "
                    "of its image encoder folder (sdxl_models/image_encoder) or set IP_ADAPTER_SDXL_IMAGE_ENCODER"
                )
        pta = self.pta_options
        needs_pta_file = self.variant == "a4a" or (base_spec is not None and self.sampling.pta_base)
        if real and needs_pta_file and not pta.weights:
            raise UserError(
                "method.pta.weights is required with a real upgraded model: set it to the path of the SD1.5 "
                "IP-Adapter (ip-adapter_sd15.bin) or set IP_ADAPTER_SD15"
            )
        if real and not pta.image_encoder:
            raise UserError(
                "method.pta.image_encoder is required with a real upgraded model: set it to the path of the "
                "IP-Adapter's image_encoder folder or set IP_ADAPTER_IMAGE_ENCODER"
            )

    def _image_encoder(self) -> ImageEncoder:
        path = self.pta_options.image_encoder
        if path:
            return load_image_encoder(path, key="method.pta.image_encoder", dtype=self.upgraded.dtype)
        return stand_in_image_encoder(self.upgraded.flavour, self.pta_options.seed)

    def _pta_layout(self) -> IPAdapterLayout:
        options = self.pta_options
        if options.weights:
            layout = read_ip_adapter(options.weights, key="method.pta.weights")
        else:
            unet = sd15_unet_structure(self.upgraded.flavour)
            layout = random_ip_adapter(unet, self.pta_encoder, options.kind, options.seed).to_layout()
        wanted = self.pta_encoder.hidden_size if layout.kind == "plus" else self.pta_encoder.embed_dim
        if layout.image_embed_dim != wanted:
            raise UserError(
                f"method.pta.weights reads {layout.image_embed_dim}-d image features, method.pta.image_encoder "
                f"gives {wanted}; use the image encoder published with this IP-Adapter"
            )
        return layout

    def _build_adapter(self, finetuned: IPAdapterModel | None, pta: IPAdapterModel | None) -> nn.Module:
        layers = self.injection.layers
        if self.variant == "from_scratch":
            return self._scratch_ip_adapter()
        options = self.adapter_options
        adapter = A4AAdapter(
            pta_dims=pta.layer_dims,
            upgraded_dims=[layer.inner_dim for layer in layers],
            num_tokens=pta.config.num_tokens,
            token_dim=pta.config.cross_attention_dim,
            scm_dim=options.scm_dim,
            repeats=options.repeats,
            heads=options.heads,
            ffn_mult=options.ffn_mult,
            use_projection=options.use_projection,
            use_mapping=options.use_mapping,
            pta_config=finetuned.public_config() if finetuned is not None else None,
        )
        if finetuned is not None:
            adapter.pta.load_state_dict(finetuned.state_dict())
        return adapter

    def _scratch_ip_adapter(self) -> IPAdapterModel:
        """IP-Adapter* (Fig. 7): a plain IP-Adapter on the upgraded layers; to_k_ip / to_v_ip start from the
        layers' own to_k / to_v (as IP-Adapter training does), the image projection at random."""
        layers = self.injection.layers
        model = IPAdapterModel(
            kind="plain",
            image_embed_dim=self.pta_encoder.embed_dim,
            cross_attention_dim=layers[0].cross_attention_dim,
            layer_dims=[layer.inner_dim for layer in layers],
        )
        with torch.no_grad():
            for layer, to_k_ip, to_v_ip in zip(layers, model.to_k_ip, model.to_v_ip, strict=True):
                to_k_ip.weight.copy_(layer.module.to_k.weight)
                to_v_ip.weight.copy_(layer.module.to_v.weight)
        return model

    def train(self, mode: bool = True) -> A4AModule:
        super().train(mode)
        if self.frozen_pta is not None:
            self.frozen_pta.eval()
        return self

    def check_compatible(self, meta: Mapping[str, Any] | None, source: str) -> None:
        """Also refuse an adapter of another shape (frozen vs fine-tuned PTA, R, d_scm, variant), in one line."""
        if meta and meta.get("method") == self.method and "adapter_config" in meta:
            mine = self.checkpoint_metadata()
            if meta.get("adapter_class") != mine["adapter_class"]:
                raise UserError(
                    f"{source} holds a {meta.get('adapter_class')}, this run builds {mine['adapter_class']}; "
                    "set method.variant to the one it was trained with"
                )
            theirs, ours = meta["adapter_config"], mine["adapter_config"]
            differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            if differing:
                key = differing[0]
                raise UserError(
                    f"{source} was trained with adapter {key}={theirs.get(key)!r}, this run builds {ours.get(key)!r}; "
                    "set method.adapter / method.training.finetune_pta / method.pta as it was trained"
                )
        super().check_compatible(meta, source)

    # ------------------------------------------------------------------ image condition
    def image_features(self, references: Tensor, drop: Tensor | None = None) -> Tensor:
        """CLIP features of the references; samples with ``drop`` get the "no image" features."""
        hidden = uses_hidden_states(self.adapter, self.frozen_pta)
        with torch.no_grad():
            features = self.pta_encoder.features(references, hidden)
            if drop is not None and bool(drop.any()):
                unconditional = self.pta_encoder.unconditional(features.shape[0], hidden)
                mask = drop.view(-1, *([1] * (features.ndim - 1))).to(features.device)
                features = torch.where(mask, unconditional.to(features.dtype), features)
        return features

    def image_keys_values(self, features: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        return image_keys_values(self.adapter, self.frozen_pta, features)

    # ------------------------------------------------------------------ training
    def _dropout(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """One draw per sample: drop the image, the text, or both (IP-Adapter's condition dropout)."""
        options = self.training_options
        draw = torch.rand(batch_size)
        image_only = draw < options.image_dropout
        text_only = (draw >= options.image_dropout) & (draw < options.image_dropout + options.text_dropout)
        both = (draw >= options.image_dropout + options.text_dropout) & (
            draw < options.image_dropout + options.text_dropout + options.both_dropout
        )
        return image_only | both, text_only | both

    def empty_text(self) -> TextConditioning:
        """The empty prompt's conditioning (encoded once: the text encoders are frozen)."""
        device = self.upgraded.device
        if self._empty_text is None or self._empty_text.prompt_embeds.device != device:
            with torch.no_grad():
                self._empty_text = self.upgraded.encode_text([""]).to(device)
        return self._empty_text

    def text_condition(self, batch: Mapping[str, Any], drop: Tensor) -> TextConditioning:
        """The captions' conditioning (from the data cache when it holds it); dropped samples get ""."""
        upgraded = self.upgraded
        if "prompt_embeds" not in batch:
            captions = ["" if dropped else caption for caption, dropped in zip(batch["caption"], drop.tolist())]
            with torch.no_grad():
                return upgraded.encode_text(captions)
        cond = TextConditioning(
            batch["prompt_embeds"], batch.get("pooled_prompt_embeds"), batch.get("prompt_attention_mask")
        ).to(upgraded.device)
        if not bool(drop.any()):
            return cond
        empty = self.empty_text()
        mask = drop.to(upgraded.device)

        def pick(value: Tensor | None, blank: Tensor | None) -> Tensor | None:
            if value is None:
                return None
            where = mask.view(-1, *([1] * (value.ndim - 1)))
            return torch.where(where, blank.to(value.dtype).expand_as(value), value)

        return TextConditioning(
            pick(cond.prompt_embeds, empty.prompt_embeds),
            pick(cond.pooled_prompt_embeds, empty.pooled_prompt_embeds),
            pick(cond.attention_mask, empty.attention_mask),
        )

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        upgraded = self.upgraded
        with torch.no_grad():
            latents = (
                batch["latents"].float() if "latents" in batch else upgraded.encode_images(batch["pixels"].float())
            )
        latents = latents.to(upgraded.device)
        batch_size = latents.shape[0]
        drop_image, drop_text = self._dropout(batch_size)
        cond = self.text_condition(batch, drop_text)
        added = upgraded.added_cond_kwargs(
            cond,
            original_size=batch.get("original_size"),
            crop_top_left=batch.get("crop_top_left"),
            target_size=batch.get("target_size"),
        )
        scheduler = upgraded.noise_scheduler
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        keys, values = self.image_keys_values(self.image_features(batch["reference"], drop_image))
        # with the call, not a `with` block: gradient checkpointing re-runs the layers during backward
        condition = self.injection.condition_for(keys, values, self.training_options.scale)
        prediction = upgraded.predict(
            noisy, timesteps, cond, added, cross_attention_kwargs={"ip_hidden_states": condition}
        )
        target = noise if upgraded.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float())
        return loss, {"image_dropped": drop_image.float().mean(), "text_dropped": drop_text.float().mean()}

    def _probe_inputs(self, batch: Mapping[str, Any], seed: int) -> tuple[Tensor, Tensor, TextConditioning, Any]:
        """Noisy latents, timesteps, text and micro-conditioning of one batch, drawn from ``seed`` (no dropout)."""
        upgraded = self.upgraded
        with torch.no_grad():
            latents = (
                batch["latents"].float() if "latents" in batch else upgraded.encode_images(batch["pixels"].float())
            ).to(upgraded.device)
            noisy, timesteps = seeded_noisy_latents(upgraded.noise_scheduler, latents, seed)
            cond = self.text_condition(batch, torch.zeros(latents.shape[0], dtype=torch.bool))
        added = upgraded.added_cond_kwargs(
            cond, batch.get("original_size"), batch.get("crop_top_left"), batch.get("target_size")
        )
        return noisy, timesteps, cond, added

    def adapted_prediction(self, batch: Mapping[str, Any], strength: float, seed: int = 0) -> Tensor:
        """The upgraded model with the image branch at lambda = ``strength``."""
        noisy, timesteps, cond, added = self._probe_inputs(batch, seed)
        keys, values = self.image_keys_values(self.image_features(batch["reference"]))
        condition = self.injection.condition_for(keys, values, strength)
        return self.upgraded.predict(
            noisy, timesteps, cond, added, cross_attention_kwargs={"ip_hidden_states": condition}
        )

    def frozen_prediction(self, batch: Mapping[str, Any], seed: int = 0) -> Tensor:
        """The upgraded model with A4A's processors taken out."""
        noisy, timesteps, cond, added = self._probe_inputs(batch, seed)
        self.injection.remove()
        try:
            return self.upgraded.predict(noisy, timesteps, cond, added)
        finally:
            self.injection.install()

    def param_groups(self) -> list[dict[str, Any]]:
        """Asynchronous learning rates: one named AdamW group per part (LearningRateMonitor logs each)."""
        rates = self.learning_rates
        if self.variant == "from_scratch":
            return [{"params": list(self.adapter.parameters()), "lr": rates.from_scratch, "name": "from_scratch"}]
        return [
            {"params": params, "lr": getattr(rates, name), "name": name}
            for name, params in self.adapter.parameter_groups().items()
        ]
