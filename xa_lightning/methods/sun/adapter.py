"""The SUN adapter: per-cross-attention-layer weights as one diffusers-style model."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from xa_lightning.backbones.surgery import AttentionLayer, Surgery, attention_layers, install_processors
from xa_lightning.errors import UserError
from xa_lightning.methods.sun.attention import PositiveOnlyAttnProcessor, SUNAttnProcessor
from xa_lightning.methods.sun.config import NORM_SCOPES, PROJECTION_INITS

# The Attention Normalization scales of a SUNLayer (method.adapter.scale_lr gives them their own rate).
SCALE_PARAMETERS = ("neg_alpha", "neg_beta", "pos_alpha", "pos_beta")


class SUNLayer(nn.Module):
    """Weights SUN adds to one cross-attention layer.

    ``to_k_neg`` / ``to_v_neg`` project the negative prompt; ``neg_alpha`` / ``neg_beta`` are Attention
    Normalization's per-channel scale and shift. With ``use_positive_branch`` the same again for an
    extra branch on the prompt (``to_k_pos`` ...), the official release's ``add_pos``.
    """

    def __init__(
        self,
        inner_dim: int,
        cross_attention_dim: int,
        use_positive_branch: bool,
        alpha_init: float = 0.0,
        beta_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.to_k_neg = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_neg = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.neg_alpha = nn.Parameter(torch.full((inner_dim,), float(alpha_init)))
        self.neg_beta = nn.Parameter(torch.full((inner_dim,), float(beta_init)))
        if use_positive_branch:
            self.to_k_pos = nn.Linear(cross_attention_dim, inner_dim, bias=False)
            self.to_v_pos = nn.Linear(cross_attention_dim, inner_dim, bias=False)
            self.pos_alpha = nn.Parameter(torch.full((inner_dim,), float(alpha_init)))
            self.pos_beta = nn.Parameter(torch.full((inner_dim,), float(beta_init)))


def _layer_shape(layer: AttentionLayer) -> tuple[int, int]:
    return int(layer.module.to_q.out_features), int(layer.module.to_k.in_features)


def _unwrapped(processor: Any) -> Any:
    """The processor SUN replaced (SUN never wraps SUN: a new adapter takes the old one's place)."""
    return processor.original if isinstance(processor, SUNAttnProcessor) else processor


class SUNAdapter(ModelMixin, ConfigMixin):
    """SpeedUpNet: all per-layer SUN weights of one denoiser architecture, installable into any denoiser
    with the same cross-attention layers (the base model, a fine-tuned one, an inpainting UNet).

    Build it with :meth:`from_unet`, plug it in with :meth:`install` (processors on the cross-attention
    layers only, through ``xa_lightning.backbones.surgery``; into several UNets at once if need be) and
    feed the UNet ``concat_negative(prompt_embeds, negative_embeds)`` as ``encoder_hidden_states``.
    ``save_pretrained`` / ``from_pretrained`` work as for any diffusers model.

    Args:
        layer_names: module paths of the cross-attention layers, e.g.
            ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.
        inner_dims: each layer's attention width (``to_q.out_features``).
        cross_attention_dims: each layer's text width (``to_k.in_features``).
        num_negative_tokens: length of the negative-prompt part of the encoder states (77 for CLIP).
        use_positive_branch: add the extra positive branch (``to_k_pos`` / ``to_v_pos``).
        norm_scope: ``"sample"`` (one norm per sample) or ``"token"`` (per sample and token).
        norm_eps: lower bound of a branch norm.
        alpha_init, beta_init: initial Attention Normalization scale and shift; 0 and 0 (default) start SUN as
            the identity (the frozen model exactly); the paper's values are 1 and 0.
    """

    @register_to_config
    def __init__(
        self,
        layer_names: Sequence[str],
        inner_dims: Sequence[int],
        cross_attention_dims: Sequence[int],
        num_negative_tokens: int = 77,
        use_positive_branch: bool = False,
        norm_scope: str = "sample",
        norm_eps: float = 1e-6,
        alpha_init: float = 0.0,
        beta_init: float = 0.0,
    ) -> None:
        super().__init__()
        if not (len(layer_names) == len(inner_dims) == len(cross_attention_dims)) or not layer_names:
            raise ValueError("layer_names, inner_dims and cross_attention_dims must be equally long and non-empty")
        if norm_scope not in NORM_SCOPES:
            raise UserError(f"sun norm_scope={norm_scope!r} is not one of {NORM_SCOPES}; fix method.adapter.norm_scope")
        self.layers = nn.ModuleList(
            SUNLayer(inner, cross, use_positive_branch, alpha_init, beta_init)
            for inner, cross in zip(inner_dims, cross_attention_dims)
        )
        self.enabled = True
        self.scale = 1.0
        # The surgery of every UNet this adapter is installed in; weak, so a dropped UNet leaves with its entry.
        self._surgeries: weakref.WeakKeyDictionary[nn.Module, Surgery] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        # Surgery handles hold closures and cannot be pickled (ddp_spawn, deepcopy): they are left out, and
        # uninstall then finds what to restore in the installed SUN processors, each keeping the one it replaced.
        state = dict(super().__getstate__())
        state["_surgeries"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._surgeries = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        num_negative_tokens: int = 77,
        use_positive_branch: bool = False,
        norm_scope: str = "sample",
        norm_eps: float = 1e-6,
        alpha_init: float = 0.0,
        beta_init: float = 0.0,
        projection_init: str = "copy",
    ) -> SUNAdapter:
        """An adapter shaped for ``unet``'s cross-attention layers.

        ``projection_init``: ``"copy"`` starts ``to_k_neg``/``to_v_neg`` (and the positive branch) from the
        layer's own ``to_k``/``to_v`` (the negative branch attends like the frozen layer from step 0);
        ``"random"`` keeps ``nn.Linear``'s default init; ``"zero"`` zeroes the value projections (also an
        identity start, but its gradients then pass through the ``1/eps`` of an all-zero branch norm: the
        default ``alpha_init=0`` is the better identity start).
        """
        if projection_init not in PROJECTION_INITS:
            raise UserError(
                f"sun projection_init={projection_init!r} is not one of {PROJECTION_INITS}; "
                "fix method.adapter.projection_init"
            )
        layers = attention_layers(unet, "cross")
        if not layers:
            raise UserError(f"{type(unet).__name__} has no cross-attention layers to install SUN into")
        adapter = cls(
            layer_names=[layer.name for layer in layers],
            inner_dims=[_layer_shape(layer)[0] for layer in layers],
            cross_attention_dims=[_layer_shape(layer)[1] for layer in layers],
            num_negative_tokens=num_negative_tokens,
            use_positive_branch=use_positive_branch,
            norm_scope=norm_scope,
            norm_eps=norm_eps,
            alpha_init=alpha_init,
            beta_init=beta_init,
        )
        adapter.to(device=unet.device)  # stays fp32 (trainable); the processor casts around an fp16 UNet
        with torch.no_grad():
            for layer, target in zip(adapter.layers, layers):
                attn = target.module
                pairs = [(layer.to_k_neg, attn.to_k), (layer.to_v_neg, attn.to_v)]
                if use_positive_branch:
                    pairs += [(layer.to_k_pos, attn.to_k), (layer.to_v_pos, attn.to_v)]
                for ours, theirs in pairs:
                    if projection_init == "copy":
                        ours.weight.copy_(theirs.weight)
                if projection_init == "zero":
                    layer.to_v_neg.weight.zero_()
                    if use_positive_branch:
                        layer.to_v_pos.weight.zero_()
        return adapter

    # ------------------------------------------------------------------ plugging in
    def check_compatible(self, unet: nn.Module) -> list[AttentionLayer]:
        """The UNet's cross-attention layers, or a UserError naming the first mismatch."""
        layers = attention_layers(unet, "cross")
        names = [layer.name for layer in layers]
        expected = list(self.config.layer_names)
        if names != expected:
            missing = sorted(set(expected) - set(names)) or sorted(set(names) - set(expected)) or names
            raise UserError(
                f"SUN adapter was built for {len(expected)} cross-attention layers, this UNet has {len(names)} "
                f"(first difference: {missing[0]}); use a SUN adapter trained for this UNet architecture"
            )
        for layer, inner, cross in zip(layers, self.config.inner_dims, self.config.cross_attention_dims):
            if _layer_shape(layer) != (inner, cross):
                raise UserError(
                    f"SUN adapter layer {layer.name} expects (inner, text) dims {(inner, cross)}, the UNet has "
                    f"{_layer_shape(layer)}; use a SUN adapter trained for this UNet architecture"
                )
        return layers

    def install(self, unet: nn.Module) -> None:
        """Route ``unet``'s cross-attention layers through SUN (self-attention keeps its processors).

        Installing again into the same UNet is a no-op change; installing into another UNet keeps this one.
        """
        layers = self.check_compatible(unet)
        self.uninstall(unet)
        by_name = dict(zip(self.config.layer_names, self.layers))
        self._surgeries[unet] = install_processors(
            unet,
            lambda layer: SUNAttnProcessor(by_name[layer.name], self, _unwrapped(layer.module.processor)),
            layers,
        )

    def uninstall(self, unet: nn.Module) -> None:
        """Give ``unet``'s cross-attention layers back the processors they had before :meth:`install`."""
        surgery = self._surgeries.pop(unet, None)
        if surgery is not None:
            surgery.remove()
            return
        ours = [
            layer
            for layer in attention_layers(unet, "cross")
            if isinstance(layer.module.processor, SUNAttnProcessor) and layer.module.processor.adapter is self
        ]
        if ours:  # installed before this adapter was copied or unpickled
            install_processors(unet, lambda layer: layer.module.processor.original, ours)

    def is_installed(self, unet: nn.Module) -> bool:
        """Whether ``unet``'s cross-attention layers run this adapter."""
        return any(
            isinstance(layer.module.processor, SUNAttnProcessor) and layer.module.processor.adapter is self
            for layer in attention_layers(unet, "cross")
        )

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, installed layers behave exactly as the frozen model (the CFG teacher shares the UNet)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def set_scale(self, scale: float) -> None:
        """Strength of SUN's correction: 0 gives the original attention, 1 the trained adapter."""
        self.scale = float(scale)


def shield_from_negative_tokens(model: nn.Module, num_negative_tokens: int) -> Surgery:
    """Let ``model``'s cross-attention (e.g. a ControlNet's) see only the prompt part of SUN's states.

    Layers already shielded are left alone; the returned :class:`Surgery` takes the shield off again.
    """

    def shield(layer: AttentionLayer) -> PositiveOnlyAttnProcessor | None:
        processor = layer.module.processor
        if isinstance(processor, PositiveOnlyAttnProcessor):
            return None
        return PositiveOnlyAttnProcessor(processor, num_negative_tokens)

    return install_processors(model, shield, attention_layers(model, "cross"))
