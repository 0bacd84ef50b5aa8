"""C&W-L2 against torchattacks' CW: one constant c (torchattacks has no binary search), the same Adam steps, in
float64, image by image.

Not bit for bit, and not for lack of the same algorithm: with Adam, a coordinate whose gradient is near Adam's eps
(1e-8) moves by lr * g / (|g| + 1e-8), so a 1e-16 difference in g can move it 1e-10, and the distance term then
grows that geometrically. torchattacks starts from tanh(atanh(2x - 1)), which is x only to rounding, and measures
the distance to x; epcli measures it to its own start, as Carlini's code does. Measured on these 64 images (30
steps): the first 2 steps agree to 3e-11, then single pixels drift apart by up to 3e-3, while the set of broken
images is the same and the smallest perturbation norms agree to 8e-4 (relative; median 2e-6). A changed loss,
step size or distance term changes the norms by more than that (tested by mutation when this was written).

Two quirks of torchattacks' CW are kept out of the comparison: its start atanh(2x - 1) is infinite at pixels 0
and 1 (the images are clamped into [0.02, 0.98]), and its "best other logit", the max of (1 - onehot) * logits,
reads 0 for the true class when every other logit is negative (the logits are shifted by +50, which changes no
decision).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import SmallCNN, train_briefly

from epcli.attacks.cw import cw_min_norm

torchattacks = pytest.importorskip("torchattacks")


class Shifted(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 50.0


@pytest.fixture(scope="module")
def case(mini):
    torch.manual_seed(0)
    model = Shifted(train_briefly(SmallCNN(), mini)).double().eval()
    x = (mini.test_x[:64].double() / 255).clamp(0.02, 0.98)
    return model, x, mini.test_y[:64]


@pytest.mark.parametrize("c", [3.0, 10.0])
def test_cw_agrees_with_torchattacks_cw_image_by_image(case, c):
    model, x, y = case
    ref = torchattacks.CW(model, c=c, kappa=0, steps=30, lr=0.01)(x, y)
    ours = cw_min_norm(model, x, y, steps=30, binary_search_steps=1, initial_const=c, abort_early=False)
    with torch.no_grad():
        attacked = model(x).argmax(1) == y  # the others are "broken" at the start by both, trivially
    ref_norm = (ref - x).flatten(1).norm(dim=1)
    broken = (ours["norm"] < float("inf")) & attacked
    assert int(broken.sum()) >= 20
    assert torch.equal(broken, (ref_norm > 0) & attacked)
    torch.testing.assert_close(ours["norm"][broken], ref_norm[broken], rtol=2e-3, atol=0)
    assert float((ours["best"] - ref)[broken].abs().max()) < 5e-3


def test_cw_accepts_float64_inputs(case):
    model, x, y = case
    out = cw_min_norm(model, x[:4], y[:4], steps=2, binary_search_steps=2)
    assert out["best"].dtype == torch.float64 and out["norm"].dtype == torch.float64
