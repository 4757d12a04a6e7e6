"""Two real DDP processes (gloo on CPU): each rank gets distinct samples and the same number of batches, and
the skip counters logged by rank 0 are the sum over ranks.

Lightning's ``ddp_fork`` starts the ranks by forking this process, so they skip the ~12 s of imports a
spawned process pays; the process group, samplers and collectives are the same as with ``ddp``.
"""

from __future__ import annotations

import json

from tests.data.helpers import Consumer, demo_faces, demo_laion, quiet_trainer


def fit_two_ranks(datamodule, out_dir):
    out_dir.mkdir()
    quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=1, limit_val_batches=0, log_every_n_steps=1).fit(
        Consumer(record_dir=out_dir), datamodule=datamodule
    )
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_process_ddp_distinct_samples_equal_batches(demo_root, tmp_path):
    laion = demo_laion(demo_root, seed=0, epoch_samples=12, shuffle_buffer=4)
    faces = demo_faces(demo_root)
    for name, datamodule, batches in (("laion", laion, 3), ("faces", faces, 4)):  # 12/(2x2); 36 faces/(2x4)
        a, b = fit_two_ranks(datamodule, tmp_path / name)
        assert a["world_size"] == b["world_size"] == 2
        assert a["batches"] == b["batches"] == batches, name
        assert len(set(a["keys"])) == len(a["keys"]) and not set(a["keys"]) & set(b["keys"]), name
        # rank 0 logs the counters summed over both ranks (each rank counts for itself)
        summed = {k: a["counts"].get(k, 0) + b["counts"].get(k, 0) for k in set(a["counts"]) | set(b["counts"])}
        assert {k[len("data/") :]: int(v) for k, v in a["logged"].items()} == summed, name
        if name == "laion":
            assert summed and a["counts"] and b["counts"]
