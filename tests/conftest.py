"""Every MPI job a test starts dies with the test, even when pytest-timeout ends it."""

import pytest

from tests.mpi_util import kill_leftovers


@pytest.fixture(autouse=True)
def _no_orphan_ranks():
    yield
    kill_leftovers()
