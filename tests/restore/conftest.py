import pytest

from tests.restore import fixtures


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(checkpoint dir, adapter dir): a random tiny base + VAE and a random adapter with non-zero gates."""
    root = tmp_path_factory.mktemp("restore_models")
    return str(fixtures.write_checkpoint(root / "ckpt")), str(fixtures.write_adapter(root / "adapter"))
