import pytest
from dist_harness import WorkerPool


@pytest.fixture(scope="session")
def pool():
    """Four gloo workers shared by the whole session (world sizes 1, 2, 4 as subgroups)."""
    workers = WorkerPool()
    yield workers
    workers.close()


@pytest.fixture(scope="session")
def scratch_pool():
    """Four more gloo workers for the tests that kill a worker or leave its ranks with
    different process groups, so that the shared pool never restarts and no test depends on
    what such a test left behind. Started on first use; a test that poisons it calls
    ``scratch_pool.discard()``."""
    workers = WorkerPool()
    yield workers
    workers.close()
