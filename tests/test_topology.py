"""Tests for dsgd_mpi.topology: pure numpy, no MPI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dsgd_mpi.topology import NAMES, Exchange, Topology, TopologyError, main

SIZES = (1, 2, 3, 4, 5, 6, 8, 16)
ROUNDS = (0, 1, 2, 3, 7)
CASES = [(name, n) for name in NAMES for n in SIZES]
SYMMETRIC = ("ring", "torus", "random_matching", "bipartite_exponential", "complete")


def make(name: str, n: int, seed: int = 0) -> Topology:
    if name == "bipartite_exponential" and n % 2:
        pytest.skip("bipartite_exponential needs even n (checked separately)")
    return Topology(name, n, seed)


def jmat(n: int) -> np.ndarray:
    return np.full((n, n), 1.0 / n)


@pytest.mark.parametrize(("name", "n"), CASES)
def test_doubly_stochastic(name: str, n: int) -> None:
    topo = make(name, n)
    for t in ROUNDS:
        w = topo.matrix(t)
        assert w.shape == (n, n)
        assert w.dtype == np.float64
        assert (w >= 0).all()
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)


@pytest.mark.parametrize(("name", "n"), CASES)
def test_exchange_pairing(name: str, n: int) -> None:
    # A Sendrecv per exchange is deadlock-free only if the m-th exchanges line up.
    topo = make(name, n)
    for t in ROUNDS:
        per_rank = [topo.exchanges(i, t) for i in range(n)]
        for i, exs in enumerate(per_rank):
            for m, e in enumerate(exs):
                assert isinstance(e, Exchange)
                assert e.send_to != i and e.recv_from != i
                peer = per_rank[e.send_to]
                assert len(peer) > m, (name, n, t, i, m)
                assert peer[m].recv_from == i, (name, n, t, i, m)
                assert per_rank[e.recv_from][m].send_to == i


@pytest.mark.parametrize(("name", "n"), CASES)
def test_weights_match_matrix_row(name: str, n: int) -> None:
    topo = make(name, n)
    for t in ROUNDS:
        w = topo.matrix(t)
        for i in range(n):
            exs = topo.exchanges(i, t)
            if topo.is_allreduce:
                assert exs == ()
                assert topo.self_weight(i, t) == pytest.approx(1.0 / n)
                continue
            row = np.zeros(n)
            row[i] += topo.self_weight(i, t)
            for e in exs:
                row[e.recv_from] += e.weight
            np.testing.assert_allclose(row, w[i], atol=1e-12)
            # merged: no two exchanges of one round with the same (send, recv)
            pairs = [(e.send_to, e.recv_from) for e in exs]
            assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize(("name", "n"), [c for c in CASES if c[0] in SYMMETRIC])
def test_symmetric(name: str, n: int) -> None:
    topo = make(name, n)
    for t in ROUNDS:
        w = topo.matrix(t)
        np.testing.assert_allclose(w, w.T, atol=1e-12)


@pytest.mark.parametrize(("name", "n"), CASES)
def test_summary_consistent(name: str, n: int) -> None:
    topo = make(name, n)
    s = topo.summary()
    json.dumps(s)  # JSON-able
    assert 0.0 <= s["rho"] <= 1.0
    assert s["spectral_gap"] == pytest.approx(1 - math.sqrt(1 - s["rho"]))
    assert s["time_varying"] == (s["lambda2"] is None)
    if s["lambda2"] is not None:
        assert s["spectral_gap"] == pytest.approx(1 - s["lambda2"], abs=1e-9)
    if n == 1:
        assert s["exact_after"] == 0 and s["degree"] == 0


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_bipartite_odd_n_rejected(n: int) -> None:
    with pytest.raises(TopologyError, match="even n"):
        Topology("bipartite_exponential", n)


def test_bad_name_and_n() -> None:
    with pytest.raises(TopologyError, match="ring"):
        Topology("rnig", 4)
    with pytest.raises(TopologyError, match="n >= 1"):
        Topology("ring", 0)
    with pytest.raises(ValueError):
        Topology("ring", 4).exchanges(4, 0)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 8, 16, 33])
def test_ring_rho_analytic(n: int) -> None:
    expected = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)) ** 2
    assert Topology("ring", n).rho() == pytest.approx(expected, abs=1e-10)


def test_ring_special_sizes() -> None:
    assert Topology("ring", 2).exchanges(0, 0) == (Exchange(1, 1, 0.5),)
    assert Topology("ring", 2).self_weight(1, 0) == 0.5
    np.testing.assert_array_equal(Topology("ring", 1).matrix(0), np.eye(1))
    assert Topology("ring", 5).exact_after() is None


def test_torus_shape_and_merging() -> None:
    # 16 = 4 x 4: four distinct neighbours at 1/5.
    topo = Topology("torus", 16)
    assert topo.degree == 4
    assert sorted(np.round(topo.matrix(0)[5], 6)[[1, 4, 6, 9]]) == [0.2] * 4
    # 8 = 2 x 4: up and down are the same peer, merged to 2/5.
    w = Topology("torus", 8).matrix(0)
    assert w[0, 4] == pytest.approx(0.4)
    assert len(Topology("torus", 8).exchanges(0, 0)) == 3
    # 5 = 1 x 5: the row shifts are the identity, adding 2/5 to self.
    assert Topology("torus", 5).self_weight(0, 0) == pytest.approx(0.6)


def test_exponential_weights() -> None:
    topo = Topology("exponential", 16)  # K = 3 -> 4 peers, weight 1/5
    exs = topo.exchanges(0, 0)
    assert [e.recv_from for e in exs] == [1, 2, 4, 8]
    assert [e.send_to for e in exs] == [15, 14, 12, 8]
    assert all(e.weight == pytest.approx(0.2) for e in exs)
    assert not topo.time_varying and topo.period == 1


@pytest.mark.parametrize("n", [8, 16])
def test_one_peer_exponential_exact(n: int) -> None:
    topo = Topology("one_peer_exponential", n)
    rounds = int(math.log2(n))
    assert topo.period == rounds
    prod = np.eye(n)
    for t in range(rounds):
        prod = topo.matrix(t) @ prod
    np.testing.assert_allclose(prod, jmat(n), atol=1e-12)
    assert topo.exact_after() == rounds
    # one round short is not yet exact
    assert not np.allclose(topo.matrix(rounds - 2) @ topo.matrix(0), jmat(n))


def test_one_peer_exponential_not_power_of_two() -> None:
    assert Topology("one_peer_exponential", 6).exact_after() is None


@pytest.mark.parametrize("n", [4, 6, 8, 16])
def test_bipartite_connected(n: int) -> None:
    topo = Topology("bipartite_exponential", n)
    prod = np.eye(n)
    for t in range(50 * topo.period):
        prod = topo.matrix(t) @ prod
    np.testing.assert_allclose(prod, jmat(n), atol=1e-6)
    assert topo.rho() > 0


def test_bipartite_n4_exact() -> None:
    assert Topology("bipartite_exponential", 4).exact_after() == 2


def test_random_matching_reproducible() -> None:
    a, b = Topology("random_matching", 8, seed=3), Topology("random_matching", 8, seed=3)
    for t in range(5):
        np.testing.assert_array_equal(a.matrix(t), b.matrix(t))
    mats = [a.matrix(t) for t in range(6)]
    assert any(not np.array_equal(mats[0], m) for m in mats[1:])
    other = Topology("random_matching", 8, seed=4)
    assert any(not np.array_equal(a.matrix(t), other.matrix(t)) for t in range(6))


@pytest.mark.parametrize("n", [2, 4, 6, 8, 16])
def test_random_matching_perfect(n: int) -> None:
    topo = Topology("random_matching", n, seed=1)
    for t in range(10):
        partners = [topo.exchanges(i, t) for i in range(n)]
        assert all(len(p) == 1 for p in partners)
        for i, (e,) in enumerate(partners):
            assert e.send_to == e.recv_from != i
            assert partners[e.send_to][0].send_to == i


def test_random_matching_odd_one_sits_out() -> None:
    topo = Topology("random_matching", 7, seed=2)
    for t in range(5):
        idle = [i for i in range(7) if not topo.exchanges(i, t)]
        assert len(idle) == 1
        assert topo.self_weight(idle[0], t) == 1.0


@pytest.mark.parametrize("n", [5, 8])
def test_random_matching_rho_monte_carlo(n: int) -> None:
    topo = Topology("random_matching", n, seed=7)
    j = jmat(n)
    acc = np.zeros((n, n))
    samples = 4000
    for t in range(samples):
        d = topo.matrix(t) - j
        acc += d.T @ d
    estimate = 1 - np.linalg.eigvalsh(acc / samples)[-1]
    assert topo.rho() == pytest.approx(estimate, abs=0.02)
    assert topo.rho() == pytest.approx(n / (2 * (n - 1)) if n % 2 == 0 else 0.5)


def test_random_matching_exact_after() -> None:
    assert Topology("random_matching", 2).exact_after() == 1
    assert Topology("random_matching", 8).exact_after() is None
    assert Topology("random_matching", 8).period is None


def test_complete() -> None:
    topo = Topology("complete", 6)
    assert topo.is_allreduce and not topo.time_varying
    assert topo.rho() == 1.0 and topo.exact_after() == 1 and topo.lambda2() == 0.0
    np.testing.assert_allclose(topo.matrix(3), jmat(6))
    assert not Topology("ring", 6).is_allreduce


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ring", "--n", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "name",
        "n",
        "seed",
        "rho",
        "spectral_gap",
        "degree",
        "exact_after",
        "period",
        "time_varying",
        "lambda2",
    ):
        assert key in out
    assert out["name"] == "ring" and out["n"] == 16 and out["exact_after"] is None


def test_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["torus", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "rho" in out and "W(0)" in out


def test_cli_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hypercube", "--n", "8"]) == 2
    err = capsys.readouterr().err
    for name in NAMES:
        assert name in err


def test_cli_bipartite_odd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bipartite_exponential", "--n", "5", "--json"]) == 2
    captured = capsys.readouterr()
    assert "even n" in captured.err and captured.out == ""
    assert "Traceback" not in captured.err
