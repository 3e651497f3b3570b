"""The demo, the benchmark and their bad-input paths, launched on real ranks."""

import json

import pytest

from tests.mpi_util import check_ranks, run_ranks


@pytest.mark.mpi
def test_demo_converges_and_respects_the_bound():
    out = check_ranks(4, ["-m", "dsgd_mpi.demo", "--rounds", "8"], timeout=180)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    rounds = [r for r in rows if len(r) == 4]  # round, estimate, exact, bound
    assert len(rounds) == 8
    estimates = [float(r[1]) for r in rounds]
    exact = [float(r[2]) for r in rounds]
    bounds = [float(r[3]) for r in rounds]
    assert all(b < a for a, b in zip(estimates, estimates[1:], strict=False))
    assert estimates[-1] < 1e-5 * estimates[0]
    assert all(x <= b for x, b in zip(exact, bounds, strict=True))


@pytest.mark.mpi
def test_bench_reports_both_timings_and_their_ratio():
    topology = "ring"
    out = check_ranks(
        4,
        [
            "-m",
            "dsgd_mpi.bench",
            "gossip",
            "--topology",
            topology,
            "--numel",
            "20000",
            "--rounds",
            "3",
            "--blocks",
            "2",
            "--json",
        ],
        timeout=180,
    )
    result = json.loads(out)
    assert result["topology"] == topology and result["n"] == 4
    # The timed work is what the labels say: one warm-up and 2 blocks x 3 rounds of the
    # Gossiper and of the bare Sendrecv, each round the ring's two neighbours' bytes.
    assert result["gossip_rounds_run"] == result["bare_rounds_run"] == 1 + 2 * 3
    assert result["bytes_per_round"] == 2 * 4 * 20000
    for key in ("gossip_s", "bare_sendrecv_s", "ratio", "control_over_round", "mix_s",
                "exchange_s", "step_estimate_s", "step_exact_s", "step_sketch_s"):  # fmt: skip
        assert 0 < result[key] < float("inf"), key


@pytest.mark.mpi
def test_bench_bad_input_exits_2_with_a_message():
    args = ["--topology", "bipartite_exponential"]  # 3 ranks: the topology's own message
    done = run_ranks(3, ["-m", "dsgd_mpi.bench", "gossip", *args], timeout=120)
    assert done.returncode == 2, done.stderr
    assert "even n" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.mpi
def test_bench_step_times_update_dsgd_and_csgd_steps():
    args = ["-m", "dsgd_mpi.bench", "step", "--model", "small_cnn", "--batch", "8",
            "--steps", "2", "--blocks", "2", "--json"]  # fmt: skip
    result = json.loads(check_ranks(2, args, timeout=180))
    assert result["model"] == "small_cnn" and result["n"] == 2 and result["params"] == 18_378
    assert 0 < result["update_s"] and 0 < result["dsgd_step_s"] and 0 < result["csgd_step_s"]
    assert 0 <= result["dsgd_comm_share"] < 1 and 0 < result["csgd_over_dsgd"]
    # one warm-up and 2 blocks x 2 steps of each kind: the gossip and the average timed
    assert result["gossip_rounds_run"] == result["averages_run"] == 1 + 2 * 2
