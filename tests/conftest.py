import pytest
from dist_harness import WorkerPool


@pytest.fixture(scope="session")
def pool():
    """Four gloo workers shared by the whole session (world sizes 1, 2, 4 as subgroups)."""
    workers = WorkerPool()
    yield workers
    workers.close()
