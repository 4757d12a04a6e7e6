"""Model surgery: the one way methods change a frozen diffusers model's forward pass.

Two tools, both reversible and both usable as context managers:

* **attention processors** on a chosen set of attention layers (:func:`attention_layers` picks them:
  cross-attention of a UNet, of a DiT such as PixArt-alpha, or of a ControlNet);
  :func:`install_processors` swaps them in and returns a :class:`Surgery` whose ``remove()`` puts the
  previous processors back;
* **forward hooks** on named blocks: :func:`hook_blocks` (any hook), :func:`capture_outputs` (record a
  block's hidden states) and :func:`add_to_outputs` (add a residual to them).

Removing leaves the model bit-identical: same ``state_dict`` keys and values, same processors objects,
same outputs. Nothing here copies or forks a diffusers model. Methods keep their weights in their own
adapter module; processors only hold references to them, so the denoiser's ``state_dict`` stays the
frozen model's (a processor that is an ``nn.Module`` would be registered under the attention layer and
appear in it: prefer plain callables).

Block outputs come in two shapes: ``mid_block`` / ``up_blocks.i`` / DiT blocks return a tensor;
``down_blocks.i`` return ``(hidden_states, skip_states)`` whose last skip state is the same tensor as
``hidden_states``. :func:`replace_hidden` changes both, so the skip connection sees a residual too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

AttentionKind = Literal["cross", "self", "all"]
Processor = Callable[..., Tensor]
BlockHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@dataclass
class AttentionLayer:
    """One attention layer of a diffusers model.

    ``name`` is the module path inside the model (e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``,
    ``transformer_blocks.3.attn2``); ``module`` the diffusers ``Attention``; ``query_dim`` the image-token width,
    ``cross_attention_dim`` the context width (= ``query_dim`` for self-attention), ``heads`` its heads, ``inner_dim``
    the width of its keys and values.
    """

    name: str
    module: Attention
    query_dim: int
    cross_attention_dim: int
    heads: int
    inner_dim: int

    @property
    def is_cross_attention(self) -> bool:
        return bool(self.module.is_cross_attention)

    @property
    def processor_name(self) -> str:
        """The key of this layer in ``model.attn_processors`` / ``set_attn_processor``."""
        return f"{self.name}.processor"

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.heads


def attention_layers(model: nn.Module, kind: AttentionKind = "cross") -> list[AttentionLayer]:
    """The model's attention layers of one kind, in ``model.attn_processors`` order.

    That is diffusers' module-registration order (UNet: down_blocks, up_blocks, then mid_block; DiT:
    transformer_blocks 0..N-1), the order IP-Adapter and SpeedUpNet checkpoints number their layers by.
    Real cross-attention counts: SD1.5 16, SDXL 70, PixArt-alpha 28.
    """
    if kind not in ("cross", "self", "all"):
        raise ValueError(f"kind must be 'cross', 'self' or 'all', not {kind!r}")
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        if kind == "cross" and not module.is_cross_attention:
            continue
        if kind == "self" and module.is_cross_attention:
            continue
        layers.append(
            AttentionLayer(
                name=name,
                module=module,
                query_dim=int(module.query_dim),
                cross_attention_dim=int(module.cross_attention_dim),
                heads=int(module.heads),
                inner_dim=int(module.to_k.out_features),
            )
        )
    return layers


class Surgery:
    """A reversible change to a model: call :meth:`remove` (or leave the ``with`` block) to undo it.

    Removing twice is a no-op. Nested surgeries must be removed in reverse order (as ``with`` blocks are).
    """

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    @property
    def active(self) -> bool:
        return self._undo is not None

    def remove(self) -> None:
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()

    def __enter__(self) -> Surgery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_processors(
    model: nn.Module,
    processors: Mapping[str, Processor] | Callable[[AttentionLayer], Processor | None],
    layers: Iterable[AttentionLayer] | None = None,
) -> Surgery:
    """Give attention layers new processors; the returned :class:`Surgery` restores the previous ones.

    ``processors``: layer name -> processor, or ``factory(layer) -> processor | None`` called for each of
    ``layers`` (default: every cross-attention layer of ``model``; None leaves a layer alone). A factory can
    read the processor it replaces from ``layer.module.processor`` (to delegate to it).
    """
    chosen = list(layers) if layers is not None else attention_layers(model, "cross")
    by_name = {layer.name: layer for layer in chosen}
    if isinstance(processors, Mapping):
        unknown = sorted(set(processors) - set(by_name))
        if unknown:
            raise KeyError(f"no such attention layer in {type(model).__name__}: {unknown[0]!r}")
        plan = {name: processors[name] for name in processors}
    else:
        plan = {}
        for layer in chosen:
            processor = processors(layer)
            if processor is not None:
                plan[layer.name] = processor
    previous: dict[str, Any] = {}
    for name, processor in plan.items():
        module = by_name[name].module
        previous[name] = module.processor
        module.set_processor(processor)

    def undo() -> None:
        for name, processor in reversed(list(previous.items())):
            by_name[name].module.set_processor(processor)

    return Surgery(undo)


# ------------------------------------------------------------------------------------------------- blocks
def hidden_of(output: Any) -> Tensor:
    """A block's hidden states: the output itself, or its first element for ``(hidden, skips)`` tuples."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Any, hidden: Tensor) -> Any:
    """``output`` with its hidden states replaced; a down block's last skip state (the same tensor) too."""
    if not isinstance(output, tuple):
        return hidden
    rest = output[1:]
    if rest and isinstance(rest[0], tuple) and rest[0] and rest[0][-1] is output[0]:
        rest = (rest[0][:-1] + (hidden,),) + tuple(rest[1:])
    return (hidden,) + tuple(rest)


def named_blocks(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The named submodules, or a KeyError listing what is missing."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise KeyError(f"{type(model).__name__} has no module {missing[0]!r}")
    return {name: modules[name] for name in names}


def hook_blocks(model: nn.Module, hooks: Mapping[str, BlockHook]) -> Surgery:
    """Register ``hook(module, args, output) -> new output | None`` as forward hooks on named blocks."""
    modules = named_blocks(model, list(hooks))
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return Surgery(undo)


@contextmanager
def capture_outputs(model: nn.Module, names: str | Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the hidden-state outputs of named blocks during the forward passes inside the context.

    Yields a dict filled as the blocks run (a later forward overwrites an entry); the hooks go on exit.
    """
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    outputs: dict[str, Tensor] = {}

    def recorder(name: str) -> BlockHook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            outputs[name] = hidden_of(output)

        return hook

    with hook_blocks(model, {name: recorder(name) for name in names}):
        yield outputs


@contextmanager
def add_to_outputs(model: nn.Module, additions: Mapping[str, Tensor | Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Add a tensor (or ``fn(hidden) -> tensor``) to named blocks' hidden states during the context."""

    def adder(addition: Tensor | Callable[[Tensor], Tensor]) -> BlockHook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            hidden = hidden_of(output)
            delta = addition(hidden) if callable(addition) else addition
            return replace_hidden(output, hidden + delta.to(hidden.dtype))

        return hook

    with hook_blocks(model, {name: adder(value) for name, value in additions.items()}):
        yield
