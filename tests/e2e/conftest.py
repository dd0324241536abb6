import pytest

from tests.support import start_cluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("e2e"), num_workers=2)
    yield cluster
    cluster.stop()
