"""Every MPI job a test starts dies with the test, even when pytest-timeout ends it."""

import pytest

from tests.mpi_util import kill_leftovers


@pytest.fixture(autouse=True)
def _no_orphan_ranks():
    yield
    kill_leftovers()


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """The small training runs of tests/shared_runs.py, made by one 4-rank MPI job."""
    from tests.shared_runs import SharedRuns

    return SharedRuns(tmp_path_factory.mktemp("shared"))
