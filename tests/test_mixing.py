"""The fused mixing kernels against a float64 reference, and numba against torch."""

import numpy as np
import pytest
import torch

from dsgd_mpi import mixing
from dsgd_mpi.sketch import CountSketch

M = 10_007  # not a multiple of any SIMD width nor of the 64-element hash block
BASE = 3  # the buffer's first element is not global index 0: offsets must add up


def _problem(peers: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(M).astype(np.float32)
    received = [rng.standard_normal(M).astype(np.float32) for _ in range(peers)]
    weights = [0.5 / peers + 0.05 * k for k in range(peers)] if peers else []
    xbar = (x + 0.1 * rng.standard_normal(M)).astype(np.float32)
    return x, received, weights, xbar


def _reference(x, received, weights, xbar):
    """The round in float64, written the obvious way."""
    x64 = x.astype(np.float64)
    d = -sum(weights) * x64
    for r, w in zip(received, weights, strict=True):
        d += w * r.astype(np.float64)
    x_new = x64 + d
    return x_new, float(d @ d), float(((x_new - xbar) ** 2).sum())


def _chunked(x, received, weights, xbar, *, chunk, measure, k=1000, seed=7):
    """Call mix_numpy chunk by chunk as gossip does; returns (estimate, distance, s)."""
    s = np.zeros(k) if measure == "sketch" else None
    estimate = distance = 0.0
    scratch = np.empty(chunk, np.float32)
    for lo in range(0, M, chunk):
        hi = min(lo + chunk, M)
        e, dist = mixing.mix_numpy(
            x[lo:hi], [r[lo:hi] for r in received], weights, scratch[: hi - lo],
            xbar=xbar[lo:hi] if measure == "exact" else None,
            sketch=mixing.SketchSink(s, BASE + lo, seed) if measure == "sketch" else None,
        )  # fmt: skip
        estimate += e
        distance += dist
    return estimate, distance, s


@pytest.mark.parametrize("measure", ["estimate", "exact", "sketch"])
@pytest.mark.parametrize("chunk", [M, 4096, 1000, 77])
@pytest.mark.parametrize("peers", [1, 2, 3, 4])
def test_kernel_matches_float64_reference(peers, chunk, measure):
    x, received, weights, xbar = _problem(peers, seed=peers)
    want_x, want_est, want_dist = _reference(x, received, weights, xbar)
    got_est, got_dist, s = _chunked(x, received, weights, xbar, chunk=chunk, measure=measure)
    np.testing.assert_allclose(x, want_x, rtol=1e-6, atol=1e-6)
    assert got_est == pytest.approx(want_est, rel=1e-5)
    if measure == "exact":
        assert got_dist == pytest.approx(want_dist, rel=1e-5)
    else:
        assert got_dist == 0.0
    if measure == "sketch":
        sketch = CountSketch(1000, 7)
        # S of the kernel's own x_new (float rounding only) and of the float64 x_new.
        exact = sketch.apply(x, offset=BASE)
        np.testing.assert_allclose(s, exact, rtol=1e-12, atol=1e-12 * np.abs(exact).max())
        np.testing.assert_allclose(s, sketch.apply(want_x, offset=BASE), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [1, 5, 64, 1000, 4096])
def test_chunked_sketch_equals_whole_sketch(k):
    # Chunks cut hash blocks anywhere; k < 64 makes a block wrap around the buckets.
    x, received, weights, xbar = _problem(2, seed=11)
    whole = x.copy()
    _, _, s_whole = _chunked(whole, received, weights, xbar, chunk=M, measure="sketch", k=k)
    for chunk in (1000, 77, 64):
        part = x.copy()
        _, _, s_part = _chunked(part, received, weights, xbar, chunk=chunk, measure="sketch", k=k)
        np.testing.assert_array_equal(part, whole)
        np.testing.assert_allclose(s_part, s_whole, rtol=1e-12, atol=1e-9)
    ref = CountSketch(k, 7).apply(whole, offset=BASE)
    np.testing.assert_allclose(s_whole, ref, rtol=1e-12, atol=1e-9)


def test_sketch_accumulates_into_the_buckets():
    # The kernel adds to s (chunks sum up): a second pass doubles nothing else.
    x, received, weights, xbar = _problem(1, seed=5)
    s = np.ones(300)
    x0 = x.copy()
    mixing.mix_numpy(x, received, [0.0], np.empty(M, np.float32), sketch=(s, 0, 9))
    np.testing.assert_array_equal(x, x0)  # zero weight: x_new = x
    np.testing.assert_allclose(s, 1.0 + CountSketch(300, 9).apply(x0), rtol=1e-12, atol=1e-12)


def test_a_rank_without_peers_still_measures():
    # A rank that sits out a matching round: no mixing, but distance and sketch of x.
    x, _, _, xbar = _problem(0, seed=2)
    s = np.zeros(128)
    est, dist = mixing.mix_numpy(x.copy(), [], [], np.empty(M, np.float32),
                                 xbar=xbar, sketch=(s, 0, 1))  # fmt: skip
    assert est == 0.0
    assert dist == pytest.approx(float(((x.astype(np.float64) - xbar) ** 2).sum()), rel=1e-6)
    np.testing.assert_allclose(s, CountSketch(128, 1).apply(x), rtol=1e-12, atol=1e-12)


def test_sums_are_float64():
    # x = 0 and w = 1 make d = r exactly, and float32 squares are exact in float64,
    # so the true sum is known to ~1e-16; the float32 running sums of the previous
    # kernel missed it by 1.8e-7 relative here.
    m = 1 << 20
    r = np.random.default_rng(0).uniform(0.1, 1.0, m).astype(np.float32)
    want = float(np.sum(r.astype(np.float64) ** 2))
    est, dist = mixing.mix_numpy(np.zeros(m, np.float32), [r], [1.0], np.empty(m, np.float32),
                                 xbar=np.zeros(m, np.float32))  # fmt: skip
    assert est == pytest.approx(want, rel=1e-12)
    assert dist == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("measure", ["estimate", "exact", "sketch"])
@pytest.mark.parametrize("peers", [0, 1, 2, 3, 4])
def test_numba_and_torch_agree(peers, measure):
    x, received, weights, xbar = _problem(peers, seed=20 + peers)
    t = torch.from_numpy
    results = []
    for fn in (mixing.mix, mixing.mix_torch):
        xt = t(x.copy())
        s = torch.zeros(777, dtype=torch.float64)
        est, dist = fn(xt, [t(r) for r in received], weights, torch.empty(M),
                       xbar=t(xbar) if measure == "exact" else None,
                       sketch=(s, 12345, 3) if measure == "sketch" else None)  # fmt: skip
        results.append((xt.numpy(), est, dist, s.numpy()))
    (x1, e1, d1, s1), (x2, e2, d2, s2) = results
    np.testing.assert_allclose(x1, x2, rtol=1e-6, atol=1e-6)
    assert e1 == pytest.approx(e2, rel=1e-5, abs=1e-12)
    assert d1 == pytest.approx(d2, rel=1e-5)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-4)
    if measure == "sketch":
        assert np.abs(s1).max() > 1.0  # it did sketch


def test_without_numba_mix_numpy_runs_the_torch_twin(monkeypatch):
    monkeypatch.setattr(mixing, "numba", None)
    x, received, weights, xbar = _problem(3, seed=4)
    want_x, want_est, want_dist = _reference(x, received, weights, xbar)
    s = np.zeros(500)
    est, dist = mixing.mix_numpy(x, received, weights, np.empty(M, np.float32),
                                 xbar=xbar, sketch=(s, BASE, 8))  # fmt: skip
    np.testing.assert_allclose(x, want_x, rtol=1e-6, atol=1e-6)
    assert (est, dist) == (pytest.approx(want_est, rel=1e-5), pytest.approx(want_dist, rel=1e-5))
    np.testing.assert_allclose(s, CountSketch(500, 8).apply(x, BASE), rtol=1e-9, atol=1e-9)


HASH_INDEX = np.concatenate(
    [np.arange(0, 300), np.arange(2**20 - 70, 2**20 + 70), [2**40 + 3, 2**62 + 5, 2**63 - 1]]
).astype(np.int64)


@pytest.mark.parametrize("k", [1, 7, 64, 1000, 2**31 - 1])
@pytest.mark.parametrize("seed", [0, 12345, -1, 2**64 - 1, 2**63 + 17])
def test_hash_is_the_same_bits_everywhere(k, seed):
    sketch = CountSketch(k, seed)
    buckets, signs = sketch.buckets_signs(HASH_INDEX)
    nb, ns = mixing._buckets_signs(HASH_INDEX, k, np.uint64(sketch.key))
    tb, ts = mixing.buckets_signs_torch(torch.from_numpy(HASH_INDEX), k, seed)
    np.testing.assert_array_equal(nb, buckets)
    np.testing.assert_array_equal(ns, signs)
    np.testing.assert_array_equal(tb.numpy(), buckets)
    np.testing.assert_array_equal(ts.numpy(), signs)
    assert buckets.min() >= 0 and buckets.max() < k
    assert set(np.unique(signs)) <= {-1.0, 1.0}


def test_numba_is_what_runs_here():
    # The speed figures in the README assume the fused path; say so if it is missing.
    assert mixing.numba is not None
