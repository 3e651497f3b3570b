"""Gossip on real MPI ranks against the in-process numpy reference."""

import pytest

from tests.mpi_util import check_ranks, run_ranks

SCRIPT = "tests/mpi/gossip_vs_numpy.py"
#: What MPICH prints at MPI_Finalize for persistent requests nobody freed.
LEAKED = "persistent request"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_gossip_equals_numpy_reference(n):
    # 1037 floats in chunks of 100: several chunks and a ragged tail; the last 37
    # floats are mixed but not measured (BatchNorm statistics with gossip.buffers).
    done = run_ranks(n, [SCRIPT, "6", "1037", "100", "1000"], timeout=240)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    names = done.stdout.split()
    assert "ring" in names and "random_matching" in names and "complete" in names
    # The script never calls close(): the Gossipers' finalizers must free them.
    assert LEAKED not in done.stderr


@pytest.mark.mpi
def test_gossip_equals_numpy_reference_16_ranks():
    out = check_ranks(16, [SCRIPT, "5", "300", "64", "300", "host"], timeout=280)
    assert "one_peer_exponential" in out.split()


@pytest.mark.mpi
def test_whole_buffer_in_one_chunk():
    check_ranks(4, [SCRIPT, "3", "5000", "1000000"], timeout=240)


@pytest.mark.mpi
def test_staged_collectives_equal_direct_ones():
    assert "port ok 3" in check_ranks(3, ["tests/mpi/port_staging.py"], timeout=120)


@pytest.mark.mpi
def test_failure_on_one_rank_fails_the_job_without_hanging():
    done = run_ranks(4, ["tests/mpi/one_rank_raises.py"], timeout=120)
    assert done.returncode != 0
    assert "deliberate failure on rank 1" in done.stderr
