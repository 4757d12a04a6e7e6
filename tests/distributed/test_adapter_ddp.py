"""trainer=ddp (``AdapterDDPStrategy``) on two CPU ranks (gloo, forked): the frozen backbones are fingerprinted
instead of re-sent from rank 0; a frozen tensor that differs on a rank is found and sent; training is plain
DDP's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from xa_lightning.distributed import AdapterDDPStrategy, _fingerprint

from .two_ranks import fit_on_two_ranks


def _digest(tensors) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


class FrozenRecorder(L.Callback):
    """Rank 1 may change one frozen weight before DDP wraps the model; at the end every rank writes digests of
    its frozen and its trainable tensors and what the strategy had to send."""

    def __init__(self, out: Path, perturb: bool) -> None:
        self.out, self.perturb, self.changed = out, perturb, None

    def setup(self, trainer, pl_module, stage) -> None:
        if self.perturb:
            self.changed, param = next((n, p) for n, p in pl_module.named_parameters() if not p.requires_grad)
            if trainer.global_rank == 1:
                with torch.no_grad():
                    param.add_(0.5)

    def on_train_end(self, trainer, pl_module) -> None:
        params = list(pl_module.named_parameters())
        record = {
            "frozen": _digest((n, p) for n, p in params if not p.requires_grad),
            "adapter": [v for _, p in params if p.requires_grad for v in p.detach().flatten().tolist()[:64]],
            "broadcast": getattr(trainer.strategy, "frozen_broadcast", None),
            "changed": self.changed,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def fit(strategy, out: Path, perturb: bool = False) -> list[dict]:
    return fit_on_two_ranks(strategy, out, "demo/sun", [FrozenRecorder(out, perturb)])


def test_fingerprints_tell_equal_from_changed_tensors():
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_fingerprint(weight), _fingerprint(weight.clone()))
    for changed in (weight.flip(0), weight.roll(1, dims=1), weight + 1e-3, torch.randn_like(weight)):
        assert not torch.equal(_fingerprint(weight), _fingerprint(changed))
    assert torch.equal(_fingerprint(torch.arange(7)), _fingerprint(torch.arange(7)))  # integer buffers too


@pytest.mark.slow
def test_frozen_weights_are_checked_not_resent_and_a_differing_one_is_repaired(tmp_path):
    plain = fit(DDPStrategy(start_method="fork"), tmp_path / "plain")
    ours = fit(AdapterDDPStrategy(start_method="fork"), tmp_path / "ours")
    for rank in (0, 1):
        assert ours[rank]["broadcast"] == []  # the same frozen weights everywhere: nothing re-sent
        assert ours[rank]["adapter"] == pytest.approx(plain[rank]["adapter"], rel=1e-6, abs=1e-8)
        assert ours[rank]["frozen"] == plain[rank]["frozen"]
    assert ours[0]["adapter"] == ours[1]["adapter"]

    repaired = fit(AdapterDDPStrategy(start_method="fork"), tmp_path / "repaired", perturb=True)
    changed = repaired[0]["changed"]
    assert [record["broadcast"] for record in repaired] == [[changed], [changed]]
    assert repaired[0]["frozen"] == repaired[1]["frozen"] == ours[0]["frozen"]  # rank 1 got rank 0's weight
