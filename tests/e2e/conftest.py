import pytest

from tests.e2e.swarm import Swarm


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def swarm(request, tiny_dir, tmp_path_factory):
    """A gateway and 3 blockservers (layers 0:2, 2:4, 4:6) serving a tiny random model."""
    directory = tiny_dir(request.param)
    s = Swarm(str(directory), ["0:2", "2:4", "4:6"], tmp_path_factory.mktemp(f"swarm-{request.param}"),
              model_name=request.param)
    s.directory = directory
    try:
        yield s.start()
    finally:
        s.stop()
