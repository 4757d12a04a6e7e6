"""Multi-process training started from ``xa-train``: how the local ranks are started, and cleaned up.

Lightning's launcher starts local ranks 1..N-1 by re-running the command line of rank 0 (under Hydra:
``python <sys.argv[0]> <sys.argv[1:]> hydra.run.dir=<run.dir> hydra.output_subdir=null ...``, or
``python -m <module of __main__> <sys.argv[1:]> ...``). Left alone, that starts ``<cwd>/xa-train`` (the CLI
renames ``sys.argv[0]``), drops the ``train`` of ``python -m xa_lightning.cli train``, and makes a sweep's
child re-run the whole sweep into a sweep directory of its own. :func:`prepare_local_ranks` sets, at the
start of every Hydra job, what Lightning rebuilds the command from: the console script (or the ``python -m``
sub-command) and the job's own overrides, and, in a sweep, the job's directory as Hydra's run directory. So
every rank runs the same job in the same directory; rank 0 alone writes checkpoints, ``metrics.json``, the
adapter export and the summary line.

:func:`local_ranks` wraps ``trainer.fit`` in the process that starts the other ranks: it waits for them
(a rank that failed fails the job), stops them when rank 0 failed, and leaves no process group and no
launcher environment behind, so the next job of a sweep starts its own ranks.

:class:`AdapterDDPStrategy` (``trainer=ddp``) checks the frozen weights across ranks by fingerprint instead
of re-sending them; :class:`FrozenFSDPStrategy` (``trainer=fsdp``) shards the frozen backbones over the ranks
block by block (FSDP2) and trains the adapter as DDP does. docs/benchmarks.md describes both.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from xa_lightning.errors import UserError

log = logging.getLogger(__name__)

CLI_MODULE = "xa_lightning.cli"
# What Lightning's launcher puts into rank 0's environment while it starts the other ranks.
LAUNCHER_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
RANK_EXIT_TIMEOUT_S = 300  # after rank 0 finished, the others only close their loggers


def _main_module() -> str | None:
    """The module ``python -m`` ran (None for a script, e.g. a console script)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    return None if spec is None else spec.name


def _console_script(prog: str, argv0: str) -> str:
    """The script that runs ``prog``: ``argv0`` when it is that console script, else the one installed
    beside this interpreter or on PATH (a user's script that called the CLI function), else ``argv0``."""
    if Path(argv0).name == prog and Path(argv0).is_file():
        return os.path.abspath(argv0)
    beside = Path(sys.executable).parent / prog
    if beside.is_file():
        return str(beside)
    return shutil.which(prog) or argv0


def prepare_local_ranks(prog: str, argv0: str) -> None:
    """Make the command Lightning starts local ranks with run this Hydra job again: call at the start of
    each job, inside Hydra. ``prog`` is the console script (``xa-train``), ``argv0`` the process's own
    ``sys.argv[0]`` as it was started."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    hydra_cfg = HydraConfig.get()
    overrides = [str(o) for o in hydra_cfg.overrides.task]  # this job's values: no -m, no sweep syntax
    overrides += [str(o) for o in hydra_cfg.overrides.hydra if not _defines_the_run(str(o))]
    if _main_module() == CLI_MODULE:  # python -m xa_lightning.cli train ...
        sys.argv = [argv0, prog.removeprefix("xa-"), *overrides]
    else:
        sys.argv = [_console_script(prog, argv0), *overrides]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # Lightning passes hydra.run.dir to the ranks; in a sweep the job's directory is the sweep's subdir.
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


# Hydra settings a rank must not take from rank 0's command line: it runs one job (no sweep, no launcher) in the
# directory and under the job name Lightning gives it. The others (logging, hydra.job.chdir ...) carry over.
RUN_LAYOUT_KEYS = ("hydra.mode", "hydra.run", "hydra.sweep", "hydra.sweeper", "hydra.launcher", "hydra/sweeper")
RUN_LAYOUT_KEYS += ("hydra/launcher", "hydra.job.name", "hydra.output_subdir")


def _defines_the_run(override: str) -> bool:
    key = override.partition("=")[0].lstrip("+~")
    return any(key == prefix or key.startswith(prefix + ".") for prefix in RUN_LAYOUT_KEYS)


def _starts_local_ranks(trainer: Any) -> bool:
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = trainer.strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
    )


def _check_restartable() -> None:
    module = _main_module()
    if module is not None and module != CLI_MODULE:
        raise UserError(
            f"trainer.devices > 1 starts one process per device by re-running the command line, which runs "
            f"{module!r} here; start multi-process training with xa-train or python -m {CLI_MODULE} train"
        )


@contextmanager
def local_ranks(trainer: Any) -> Iterator[None]:
    """Around ``trainer.fit``: when this process starts the other local ranks, wait for them afterwards (or
    stop them when fit raised), then close the process group and restore the environment."""
    if not _starts_local_ranks(trainer):
        yield
        return
    _check_restartable()
    launcher = trainer.strategy.launcher
    saved_environment = {key: os.environ.get(key) for key in LAUNCHER_ENVIRONMENT}
    stop_ranks = False
    try:
        yield
    except SIGTERMException:  # preempted: every rank agreed to stop after the checkpoint and exits by itself
        raise
    except BaseException:
        stop_ranks = True  # the others would wait for rank 0 in their next collective
        raise
    finally:
        # Lightning's observer thread shares this list and kills rank 0 when a rank exits non-zero; emptied,
        # it stops watching, and the ranks' ends are handled here.
        ranks = list(launcher.procs)
        launcher.procs.clear()
        if stop_ranks:
            for process in ranks:
                process.kill()
        exit_codes = [_wait(process) for process in ranks]
        _close_process_group()
        for key, value in saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    failed = [(rank, code) for rank, code in enumerate(exit_codes, start=1) if code != 0]
    if failed:
        rank, code = failed[0]
        where = Path(trainer.default_root_dir) / f"train_ddp_process_{rank}.log"
        raise RuntimeError(f"rank {rank} exited with status {code}; its log: {where}")


def _wait(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=RANK_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("rank process %d did not exit %d s after rank 0; stopping it", process.pid, RANK_EXIT_TIMEOUT_S)
        process.kill()
        return process.wait()


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------- FSDP
def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """The units a frozen model is sharded in: its UNet down / mid / up blocks or DiT transformer blocks, or a text
    encoder's layers (CLIP) / blocks (T5). Each is gathered for its own forward only. What lies outside them
    (embeddings, input / output convolutions, final norms: about 1 % of a UNet or DiT, 3 % of T5-XXL) stays whole,
    and so do the models' own classes, which diffusers and transformers look up by name."""
    blocks: list[nn.Module] = []
    for name in ("down_blocks", "up_blocks", "transformer_blocks"):
        blocks += list(getattr(model, name, None) or [])
    if getattr(model, "mid_block", None) is not None:
        blocks.append(model.mid_block)
    for layers in ("text_model.encoder.layers", "encoder.layers", "encoder.block"):  # CLIP (both layouts), T5
        if _has_submodule(model, layers):
            blocks += list(model.get_submodule(layers))
    return blocks


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def shard_frozen_backbones(module: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> list[str]:
    """``fully_shard`` (FSDP2) the denoiser and the text encoders of every :class:`Backbone` inside ``module``,
    block by block (:func:`shardable_blocks`); returns the names of the parameters now sharded. The VAE, image
    encoders, plugins and the adapter stay whole: methods call them outside a forward of their own (``vae.encode``)
    or train them. ``reshard_after_forward`` is explicit: each block is its own FSDP root, and a root left to
    the default would keep its weights gathered after its forward."""
    from torch.distributed.fsdp import fully_shard

    from xa_lightning.backbones import Backbone

    backbones = [m for m in module.modules() if isinstance(m, Backbone)]
    for backbone in backbones:
        for model in [backbone.denoiser, *backbone.text_encoders]:
            trainable = [name for name, p in model.named_parameters() if p.requires_grad]
            if trainable:  # a trained part (a fine-tuned PTA, say) must stay with the adapter
                raise UserError(
                    f"trainer=fsdp shards frozen models only, but {type(model).__name__}.{trainable[0]} trains; "
                    "use trainer=ddp"
                )
            for block in shardable_blocks(model):
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    sharded = {
        id(p) for b in backbones for m in [b.denoiser, *b.text_encoders] for p in m.parameters() if _is_dtensor(p)
    }
    return [name for name, p in module.named_parameters() if id(p) in sharded]


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# Fingerprints read a frozen tensor in chunks of this many elements (a float64 copy of one chunk at a time).
_FINGERPRINT_CHUNK = 1 << 22


def _fingerprint(tensor: Any) -> Any:
    """Four float64 sums of a tensor (values, squares, alternating signs, chunk-weighted): equal tensors give
    equal fingerprints; a different draw, a shifted or a permuted tensor practically never does."""
    import torch

    flat = tensor.detach().reshape(-1)
    sums = torch.zeros(4, dtype=torch.float64, device=flat.device)
    for index, start in enumerate(range(0, flat.numel(), _FINGERPRINT_CHUNK)):
        chunk = flat[start : start + _FINGERPRINT_CHUNK].double()
        total = chunk.sum()
        sums += torch.stack([total, (chunk * chunk).sum(), chunk[0::2].sum() - chunk[1::2].sum(), (index + 1) * total])
    return sums


def sync_frozen_state(model: nn.Module, device: Any, skip: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """Make ``model``'s frozen parameters and its buffers equal on every rank without sending them all.

    Every rank loads the frozen backbones from the same files (or builds the same seeded tiny ones), so each
    rank fingerprints them and only the tensors whose fingerprint differs from rank 0's are broadcast from
    rank 0 (a frozen random stand-in drawn per rank, different hardware). ``skip``: names handled elsewhere
    (sharded ones). Returns (every name made equal, the names that were broadcast)."""
    import torch
    import torch.distributed as dist

    skip = set(skip)
    tensors = {name: p for name, p in model.named_parameters() if not p.requires_grad and name not in skip}
    tensors.update((name, b) for name, b in model.named_buffers() if name not in skip)
    names = list(tensors)
    if not names:
        return [], []
    local = torch.stack([_fingerprint(tensors[name]).to(device) for name in names])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    differs = torch.stack([(rank != gathered[0]).any(dim=1) for rank in gathered]).any(dim=0).tolist()
    broadcast = [name for name, differ in zip(names, differs) if differ]
    with torch.no_grad():
        for name in broadcast:
            tensor = tensors[name].data
            buffer = tensor if tensor.is_contiguous() and tensor.device == device else tensor.contiguous().to(device)
            dist.broadcast(buffer, src=0)
            if buffer is not tensor:
                tensor.copy_(buffer)
    return names, broadcast


class AdapterDDPStrategy(DDPStrategy):
    """``trainer=ddp``: DDP over the adapter. Plain DDP broadcasts every parameter and buffer from rank 0 when
    it wraps the model, gigabytes of frozen backbone for SDXL or PixArt's T5; here the frozen ones are only
    fingerprinted and broadcast where they differ (:func:`sync_frozen_state`), then left out of DDP.
    ``frozen_broadcast`` lists what had to be sent (logged when not empty)."""

    strategy_name = "xa_adapter_ddp"
    frozen_broadcast: list[str]

    def _handled_elsewhere(self, model: nn.Module) -> list[str]:
        """Names of tensors a subclass distributes its own way (neither fingerprinted nor given to DDP)."""
        return []

    def _setup_model(self, model: nn.Module) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        elsewhere = self._handled_elsewhere(model)
        frozen, self.frozen_broadcast = sync_frozen_state(model, self.root_device, skip=elsewhere)
        if self.frozen_broadcast and self.global_rank == 0:
            shown = ", ".join(self.frozen_broadcast[:3]) + (", ..." if len(self.frozen_broadcast) > 3 else "")
            log.info(
                "ddp: %d frozen tensors differed across ranks, sent from rank 0 (%s)", len(self.frozen_broadcast), shown
            )
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [*elsewhere, *frozen])
        return super()._setup_model(model)


class FrozenFSDPStrategy(AdapterDDPStrategy):
    """``trainer=fsdp``: the frozen backbones sharded over the ranks, the adapter trained as with DDP.

    The frozen models are what is large (SDXL's UNet 2.6 B parameters, PixArt's T5-XXL 4.7 B; the adapters are
    tens to hundreds of millions): each denoiser and text encoder is split with FSDP2's ``fully_shard`` into
    blocks (:func:`shardable_blocks`), each rank keeps 1/N of every block, and a block's weights are gathered
    just for its forward (and again for the backward through it). The adapter is not sharded: DDP replicates it
    and averages its gradients, so the optimizer holds the adapter alone, checkpoints and the adapter export are
    the plain adapter-only files of every other strategy, and attention processors and block hooks reach its
    weights from inside the frozen forward. Works on the CPU (gloo) too.

    Every forward of a sharded model is a collective: all ranks must run the same number of them. Training does;
    the evaluation callback does when ``eval.num_images`` gives every rank the same number of batches (checked
    at setup).
    """

    strategy_name = "xa_frozen_fsdp"

    def __init__(self, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup(self, trainer: Any) -> None:
        _check_evaluation_batches(trainer, self.world_size)
        super().setup(trainer)

    def _handled_elsewhere(self, model: nn.Module) -> list[str]:
        """Shard the frozen denoisers and text encoders; DDP must neither broadcast nor bucket them. The other
        frozen parts (VAE, image encoders) are fingerprinted as with ``trainer=ddp``; DDP handles the adapter."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        return shard_frozen_backbones(model, mesh, self.reshard_after_forward)


def _check_evaluation_batches(trainer: Any, world_size: int) -> None:
    """Sharded models need the same number of evaluation batches on every rank (one collective per forward)."""
    from xa_lightning.callbacks.evaluation import EvaluationCallback

    for callback in trainer.callbacks:
        if isinstance(callback, EvaluationCallback):
            count, batch_size = callback.config.num_images, callback.config.batch_size
            batches = {-(-len(range(rank, count, world_size)) // batch_size) for rank in range(world_size)}
            if len(batches) > 1:
                raise UserError(
                    f"trainer=fsdp: eval.num_images={count} gives the {world_size} ranks different numbers of "
                    f"batches of eval.batch_size={batch_size}; use a multiple of {world_size * batch_size}"
                )
