import os

import pytest
import torch

# Tests run on the CPU with few threads: CI machines have 2 cores, shared.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("EPCLI_DEVICE", "cpu")


@pytest.fixture(scope="session")
def mini(tmp_path_factory):
    """The embedded real CIFAR-10 subset (5,000 train + 1,000 test), decoded once per session."""
    from epcli.data import load_dataset
    return load_dataset(None, cache_dir=tmp_path_factory.mktemp("cache"))
