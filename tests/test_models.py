"""The model registry: every entry builds, maps [0,1] images to logits, trains, and round-trips its spec."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from epcli.data import load_dataset, subset
from epcli.errors import UnknownModelError, UsageError
from epcli.models import (CIFAR10_MEAN, PAPER_STD, Normalize, build_from_spec, create_model, list_models,
                          model_info)


try:
    import epcli.ep  # noqa: F401
    HAVE_EP = True
except ImportError:
    HAVE_EP = False

ENTRIES = list_models()
EXTRA = ["timm:mobilenetv3_small_050"]  # resnet18 is timm:resnet18 with a CIFAR stem


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """8 real CIFAR-10 training images in [0,1] with their labels."""
    d = load_dataset(None, cache_dir=tmp_path_factory.mktemp("cache"))
    x, y, _ = subset(d.train_x, d.train_y, 8, seed=1)
    return x.float() / 255, y


def _num_classes(name):
    return 100 if name.endswith("cifar100") else 10


def _prepare(model):
    """Short relaxations for the EP-CNN on CPU (the EP tests cover the long ones)."""
    if hasattr(model, "ep_train_step"):
        model.T = model.depth + 1
    return model


@pytest.mark.parametrize("name", ENTRIES + EXTRA)
def test_entry_builds_maps_to_logits_and_round_trips(name, real, tmp_path):
    if name.startswith("ep-") and not HAVE_EP:
        pytest.skip("epcli.ep not available")
    x, _ = real
    nc = _num_classes(name)
    torch.manual_seed(0)
    model = _prepare(create_model(name, nc)).eval()
    spec = model.spec
    assert spec["name"] == name and spec["num_classes"] == nc
    spec = json.loads(json.dumps(spec))  # JSON-serialisable
    with torch.no_grad():
        out = model(x[:4])
    assert out.shape == (4, nc) and out.dtype == torch.float32 and torch.isfinite(out).all()

    # spec -> architecture; weights through a safetensors file
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"spec": json.dumps(spec)})
    clone = _prepare(build_from_spec(json.loads(json.dumps(spec))))
    clone.load_state_dict(load_file(str(path)))
    clone.eval()
    assert clone.spec == model.spec
    with torch.no_grad():
        assert torch.allclose(clone(x[:4]), out, atol=1e-5)


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_trains_a_few_steps(name, real):
    """A few steps on one real batch lower the loss (backprop; the EP-CNN through its own train step)."""
    if name.startswith("ep-") and not HAVE_EP:
        pytest.skip("epcli.ep not available")
    x, y = real
    x, y = x[:4], y[:4]
    torch.manual_seed(0)
    model = _prepare(create_model(name, _num_classes(name))).train()
    ep = hasattr(model, "ep_train_step")
    if name.startswith("vit"):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05 if not ep else 0.2, momentum=0.9)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        if ep:  # exact gradient (BPTT rule) so that "loss goes down" is a fair check on 4 steps
            out = model.ep_train_step(x, y, model.T, model.T, 0.5, "bptt")
            losses.append(float(out["loss"]))
        else:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
        opt.step()
    with torch.no_grad():  # still in train mode: BatchNorm uses batch statistics, as during the steps
        final = F.cross_entropy(model(x), y).item()
    assert final < losses[0], (name, losses, final)


def test_paper_cnn_matches_the_paper():
    m = create_model("cnn")
    convs = [l for l in m.features if isinstance(l, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 256, 512, 512]
    assert [c.padding[0] for c in convs] == [1, 1, 1, 0] and all(c.bias is None for c in convs)
    assert sum(isinstance(l, torch.nn.BatchNorm2d) for l in m.features) == 4
    assert sum(isinstance(l, torch.nn.MaxPool2d) for l in m.features) == 4
    assert m.head.in_features == 512 and m.head.out_features == 10
    assert m.spec["std"] == pytest.approx([3 * s for s in PAPER_STD])  # normalisation as the paper: 3 x std
    assert m.spec["mean"] == pytest.approx(list(CIFAR10_MEAN))
    wide = create_model("cnn", 100)
    assert wide.head.in_features == 1024 and wide.head.out_features == 100
    assert create_model("cnn-cifar100").head.in_features == 1024
    hs = create_model("cnn-hardsigmoid")
    assert hs.spec["activation"] == "hardsigmoid"
    assert torch.equal(hs.features[2](torch.tensor([-1.0, 1.0, 3.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_vit_is_the_papers_size_and_patch_override():
    vit = create_model("vit")
    n = sum(p.numel() for p in vit.parameters())
    assert 5.5e6 < n < 7e6
    assert vit.spec["patch_size"] == 4 and vit.spec["depth"] == 7 and vit.spec["embed_dim"] == 384
    assert vit.net.patch_embed.num_patches == 64
    p8 = create_model("vit", patch_size=8)
    assert p8.net.patch_embed.num_patches == 16 and p8.spec["patch_size"] == 8
    assert create_model("vit-p8").spec["patch_size"] == 8


def test_resnet18_has_a_cifar_stem():
    m = create_model("resnet18")
    assert m.net.conv1.kernel_size == (3, 3) and m.net.conv1.stride == (1, 1)
    assert isinstance(m.net.maxpool, torch.nn.Identity)


def test_normalize_is_inside_the_model():
    n = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert torch.allclose(n(torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))
    assert "mean" not in n.state_dict()  # constants travel in the spec


def test_unknown_names_and_options_fail_with_one_line():
    with pytest.raises(UnknownModelError, match="did you mean cnn"):
        create_model("cnnn")
    with pytest.raises(UnknownModelError, match=r"unknown timm model 'resnet1'.*timm:resnet18"):
        create_model("timm:resnet1")
    with pytest.raises(UsageError, match="cannot take 32x32"):
        create_model("timm:inception_v3")
    with pytest.raises(UsageError, match="no option widht"):
        create_model("cnn-small", widht=3)
    with pytest.raises(UsageError, match="num_classes"):
        create_model("cnn", num_classes=1)
    with pytest.raises(UsageError, match="patch_size must divide 32"):
        create_model("vit", patch_size=5)
    for err in (UnknownModelError, UsageError):
        try:
            create_model("cnnn") if err is UnknownModelError else create_model("timm:inception_v3")
        except err as e:
            assert "\n" not in str(e)


def test_none_overrides_keep_defaults_and_info():
    assert create_model("cnn-small", width=None).spec["width"] == 16
    assert model_info("cnn")["help"]
    assert ENTRIES == sorted(ENTRIES) and {"cnn", "vit", "resnet18", "ep-cnn"} <= set(ENTRIES)
    assert list_models("ep-*") == [n for n in ENTRIES if n.startswith("ep-")]


def test_importing_the_registry_does_not_import_timm():
    code = "import sys, epcli.models, epcli.train; print('timm' in sys.modules, 'epcli.ep' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
