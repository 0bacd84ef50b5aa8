import os

import pytest
import torch

# Tests run on the CPU with one intra-op thread: the models and images are small, and on a shared 2-core machine
# two threads only wait for each other on every op (measured up to ~20x slower under load). Set once, here; the
# distributed tests' one-process references rely on it too (every torchrun process runs with one thread).
torch.set_num_threads(1)
os.environ.setdefault("EPCLI_DEVICE", "cpu")

# CUDA: the `device` fixture runs a test on the CPU and, where a GPU is present, again on CUDA. Tests marked
# `cuda` (tests/test_cuda.py, the cuda half of `device`) skip with a reason on machines without one.
CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA GPU here: bench/device_check.py runs these on one (docs/benchmarks.md)"
# EPCLI_CUDA_TESTS_ON=cpu runs the CPU-vs-CUDA comparisons CPU-vs-CPU instead: checks the test code itself on a
# machine without a GPU (the tests that need CUDA-only calls still skip).
SECOND = os.environ.get("EPCLI_CUDA_TESTS_ON", "cuda")


def pytest_collection_modifyitems(config, items):
    if CUDA or SECOND != "cuda":
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """torch.device("cpu"), then torch.device("cuda") where a GPU is present (else that half skips)."""
    return torch.device(request.param if request.param == "cpu" else SECOND)


@pytest.fixture
def exact_cuda():
    """fp32 on CUDA as on the CPU: no TF32 in convs or matmuls, deterministic cuDNN algorithms; restored after
    (EPCNN.accelerate turns TF32 and cudnn.benchmark on for the whole process)."""
    b = torch.backends
    old = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic)
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = b.cudnn.benchmark = False
    b.cudnn.deterministic = True
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic = old


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


def train_briefly(model, dataset, steps: int = 60, n: int = 2000):
    """`steps` Adam steps (batch 64, lr 3e-3) on the first n real training images: a model that is right often
    enough for attacks to have work to do. Seed before building the model. Returns the model in eval mode."""
    import torch.nn.functional as F
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = dataset.train_x[:n].float() / 255, dataset.train_y[:n]
    for _ in range(steps):
        j = torch.randint(0, len(yt), (64,))
        opt.zero_grad()
        F.cross_entropy(model(xt[j]), yt[j]).backward()
        opt.step()
    return model.eval()


class SmallCNN(torch.nn.Module):
    """One strided 5x5 conv (8 channels), ReLU and a linear read-out: the attack tests' model (fast, and with
    train_briefly right often enough for attacks to have work to do)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4, padding=2)
        self.fc = torch.nn.Linear(8 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))
