import pytest

from tests.support import start_cluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    # answers to "gpt2" too, as the reference implementation's clients call it (vLLM's --served-model-name)
    cluster = start_cluster(tmp_path_factory.mktemp("e2e"), num_workers=2,
                            WORKER_SERVED_MODEL_NAME="tiny-gpt2,gpt2")
    yield cluster
    cluster.stop()
