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


def write_imagefolder(root, dataset, n_train: int, n_test: int):
    """The first n images per class of a Dataset as an ImageFolder tree of lossless PNGs (real images)."""
    from PIL import Image
    for split, x, y, n in (("train", dataset.train_x, dataset.train_y, n_train),
                           ("test", dataset.test_x, dataset.test_y, n_test)):
        for c, name in enumerate(dataset.classes):
            (root / split / name).mkdir(parents=True)
            for i in (y == c).nonzero().flatten()[:n].tolist():
                Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(root / split / name / f"{i}.png")
    return root
