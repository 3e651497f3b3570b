"""The CountSketch: a fixed linear map, unbiased for squared norms, error ~ sqrt(2/k)."""

import math

import numpy as np
import pytest

from dsgd_mpi.sketch import CountSketch


def test_the_map_is_fixed_by_k_and_seed():
    index = np.arange(50_000)
    b1, s1 = CountSketch(1000, 42).buckets_signs(index)
    b2, s2 = CountSketch(1000, 42).buckets_signs(index)
    b3, s3 = CountSketch(1000, 43).buckets_signs(index)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(s1, s2)
    assert (b1 != b3).mean() > 0.9  # another seed, another map
    assert 0.45 < (s1 != s3).mean() < 0.55
    # Every bucket used (781 blocks of 64 over 1000 buckets), signs balanced.
    assert np.bincount(b1, minlength=1000).min() > 0
    assert abs(s1.mean()) < 0.05


def test_apply_is_linear_and_chunks_add_up():
    rng = np.random.default_rng(0)
    sketch = CountSketch(300, 5)
    x, y = rng.standard_normal((2, 2_000))
    whole = sketch.apply(x, offset=17)
    np.testing.assert_allclose(sketch.apply(2 * x - y, 17), 2 * whole - sketch.apply(y, 17),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    out = np.zeros(300)
    for lo in range(0, x.size, 333):  # cuts 64-element hash blocks anywhere
        sketch.apply(x[lo : lo + 333], offset=17 + lo, out=out)
    np.testing.assert_allclose(out, whole, rtol=1e-12, atol=1e-12)
    # A unit vector lands, with its sign, in its bucket.
    b, s = sketch.buckets_signs(np.array([17 + 1234]))
    e = np.zeros(x.size)
    e[1234] = 1.0
    np.testing.assert_array_equal(sketch.apply(e, offset=17), s[0] * np.eye(300)[b[0]])


def test_squared_norm_is_unbiased_over_seeds():
    # A fixed vector with a non-zero mean and structure along the index: a sketch
    # whose signs were not fair coins, or were tied to each other or to the
    # buckets, would be far off (all signs +1 gives ~10x here).
    rng = np.random.default_rng(1)
    d, k, seeds = 3_000, 256, 1_024
    x = 1.0 + 0.5 * rng.standard_normal(d) + np.sin(np.arange(d) / 7.0)
    norm2 = x @ x
    ratios = np.array([np.sum(CountSketch(k, s).apply(x) ** 2) / norm2 for s in range(seeds)])
    # Each ratio has standard deviation <= sqrt(2/k) = 0.088, so the mean of 1024
    # has standard error <= 0.088 / 32 = 0.0028: 2 % is more than 7 standard errors.
    bound_se = math.sqrt(2 / k) / math.sqrt(seeds)
    sample_se = ratios.std(ddof=1) / math.sqrt(seeds)
    assert sample_se <= 1.1 * bound_se  # the variance bound holds (up to sampling)
    assert 0.02 >= 6 * sample_se  # so this test can tell a 2 % bias from noise
    assert abs(ratios.mean() - 1.0) < 0.02


def test_relative_error_is_about_sqrt_2_over_k():
    # |ratio - 1| > 3 sqrt(2/k) has probability ~0.3 % (near-Gaussian at k = 1024);
    # over 2000 draws that is ~6 misses, and 20 (1 %) is ~5 standard deviations away.
    rng = np.random.default_rng(2)
    d, k, draws = 8_192, 1_024, 2_000
    limit = 3 * math.sqrt(2 / k)
    misses = 0
    errors = []
    for seed in range(draws):
        x = rng.standard_normal(d)
        err = np.sum(CountSketch(k, 10_000 + seed).apply(x) ** 2) / (x @ x) - 1.0
        errors.append(err)
        misses += abs(err) > limit
    assert misses <= 0.01 * draws
    # And the spread is what the docstring promises, not much smaller either
    # (a sketch that was secretly exact would not be a CountSketch).
    assert 0.8 * math.sqrt(2 / k) < np.std(errors) < 1.1 * math.sqrt(2 / k)


def test_distance_is_the_sketch_of_the_deviations_and_estimates_xi2():
    rng = np.random.default_rng(3)
    n, d, k = 8, 20_000, 4_096
    common = rng.standard_normal(d)
    xs = common + 0.1 * rng.standard_normal((n, d))  # replicas near consensus
    dev = xs - xs.mean(axis=0)
    xi2 = float(np.sum(dev**2) / n)
    sigma = math.sqrt(2 / k)
    errors = []
    for seed in range(20):
        sketch = CountSketch(k, seed)
        rows = np.stack([sketch.apply(x) for x in xs])
        got = sketch.distance(rows)
        # Linearity: the mean of the sketches is the sketch of the mean.
        by_dev = float(np.mean([np.sum(sketch.apply(v) ** 2) for v in dev]))
        assert got == pytest.approx(by_dev, rel=1e-9)
        errors.append(got / xi2 - 1.0)
    errors = np.array(errors)
    # Relative error sqrt(2/k) = 2.2 % at most per draw: 5 sigma never, and the
    # root mean square of 20 draws above 1.6 sigma has probability ~1e-4.
    assert np.abs(errors).max() < 5 * sigma
    assert math.sqrt(np.mean(errors**2)) < 1.6 * sigma


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        CountSketch(0, 1)
    with pytest.raises(ValueError, match="k must be"):
        CountSketch(2**31, 1)
    with pytest.raises(ValueError, match="indices"):
        CountSketch(8, 1).buckets_signs(np.array([-1]))
    with pytest.raises(ValueError, match="sketches must be"):
        CountSketch(8, 1).distance(np.zeros((3, 9)))


def test_the_logged_sketch_at_exit_is_independent_of_the_one_that_stopped_the_loop():
    """The loop stops on the first sketched value at or below the target, so that value
    is at or below it every time, while the replicas' true Xi^2 is above it whenever the
    sketch happened to err low. The recorded value is re-sketched independently: it is
    above the target about as often as the truth, and unbiased on average."""
    import torch

    from dsgd_mpi.consensus import Consensus, Measure
    from dsgd_mpi.replica import Buffers
    from dsgd_mpi.schedule import PhaseSpan
    from dsgd_mpi.sim.group import SimGroup
    from dsgd_mpi.topology import Topology

    n, d, trials = 16, 4096, 120
    group = SimGroup(n)
    flats = [torch.zeros(d) for _ in range(n)]
    buffers = Buffers(flats)
    consensus = Consensus(group, buffers, Topology("ring", n),
                          Measure("sketch", group, buffers, sketch_size=64, seed=3))  # fmt: skip
    phase = PhaseSpan(0, 0.0, 1.0, "constant", 1.0, 1.0, None, 200, 0.9)
    rng = np.random.default_rng(0)
    logged, true, target = [], [], []
    for t in range(trials):
        # The ring's slowest mode: Xi^2 falls ~10 % a round, less than the sketch errs.
        a, b = rng.standard_normal((2, d))
        angle = 2 * np.pi * np.arange(n)[:, None] / n
        deviations = (np.cos(angle) * a + np.sin(angle) * b).astype(np.float32)
        for f, x in zip(flats, deviations, strict=True):
            f.copy_(torch.from_numpy(x))
        start = float(((deviations - deviations.mean(0)) ** 2).sum(1).mean())
        out = consensus.communicate(phase, 0.3 * start, step=t, record=True)
        assert 1 < out.rounds < 200  # the target was met after a few rounds
        params = np.stack([f.numpy() for f in flats]).astype(np.float64)
        logged.append(out.measured)
        true.append(float(((params - params.mean(0)) ** 2).sum(1).mean()))
        target.append(0.3 * start)
    logged, true, target = map(np.array, (logged, true, target))
    above_true, above_logged = (true > target).mean(), (logged > target).mean()
    assert 0.1 < above_true < 0.9  # the sketch's error decides some exits
    assert abs(above_logged - above_true) < 0.2, (above_logged, above_true)
    ratio = logged / true
    se = ratio.std(ddof=1) / np.sqrt(trials)
    assert abs(ratio.mean() - 1) < 3 * se + 0.01
