"""A run stopped at step k (mid-epoch) and resumed from its checkpoint equals the run that never stopped:
the same batches in the same order, the same losses, the same adapter weights, the same sample counts.

Every method on its demo experiment (tiny backbones, demo data), with epochs of 4 batches so that the
resumed part crosses into the next epoch. The methods draw noise, timesteps and negative prompts from
torch's global generator and the data stream is shuffled: only a checkpoint that holds the generators and
the data position (per rank, per worker) passes.
"""

from __future__ import annotations

import pytest

from tests.reliability.helpers import adapter_state, fit_demo, max_difference

CASES = [
    pytest.param("demo/sun", ["data.epoch_samples=8"], id="sun"),
    pytest.param("demo/x_adapter", ["data.epoch_samples=8"], id="x_adapter"),
    pytest.param("demo/a4a", ["data.batch_size=8"], id="a4a-map-style"),
    # two loader workers: a resume at an odd step must keep their round-robin order
    pytest.param("demo/sun", ["data.epoch_samples=12", "data.num_workers=2"], id="sun-2-workers"),
]


@pytest.mark.slow
@pytest.mark.parametrize("experiment,overrides", CASES)
def test_mid_epoch_resume_equals_the_uninterrupted_run(experiment, overrides, tmp_path):
    total, stop = 6, 3
    straight, straight_data, straight_steps = fit_demo(experiment, tmp_path / "straight", total, *overrides)

    _, _, first_steps = fit_demo(experiment, tmp_path / "first", stop, *overrides, save_every=stop)
    resumed, resumed_data, resumed_steps = fit_demo(
        experiment, tmp_path / "resumed", total, *overrides, ckpt_path=tmp_path / "first" / "checkpoints" / "last.ckpt"
    )

    assert sorted(resumed_steps) == list(range(stop + 1, total + 1)), "the resumed run repeated or skipped steps"
    interrupted = {**first_steps, **resumed_steps}
    for step in range(1, total + 1):
        assert interrupted[step][1] == straight_steps[step][1], f"step {step}: other batch"
        assert interrupted[step][0] == pytest.approx(straight_steps[step][0], abs=1e-6), f"step {step}: other loss"
    assert max_difference(adapter_state(resumed), adapter_state(straight)) <= 1e-6
    assert resumed.samples_seen == straight.samples_seen
    assert resumed_data.sample_counts() == straight_data.sample_counts()
