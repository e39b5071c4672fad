"""The net-variance probe: eq. 6 against Monte Carlo and against the empirical probe; which sites dropout feeds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaaf_patch.analysis import eq6_variance, net_variance
from gaaf_patch.analysis.variance import batches_of

F64 = torch.float64


def _toy(p: float = 0.3, inplace: bool = False) -> nn.Sequential:
    """linear -> dropout -> linear -> tanh: the site's net is a Linear of the dropout's output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Dropout(p, inplace=inplace), nn.Linear(20, 16), nn.Tanh())


def test_eq6_by_hand():
    """Var(z_j) = p/(1-p) sum_i W_ji^2 x_i^2 (inverted dropout), written out as loops."""
    torch.manual_seed(1)
    layer, x, p = nn.Linear(3, 2).requires_grad_(False), torch.randn(1, 3), 0.25
    want = [p / (1 - p) * sum(float(layer.weight[j, i]) ** 2 * float(x[0, i]) ** 2 for i in range(3)) for j in range(2)]
    torch.testing.assert_close(eq6_variance(layer, x, p)[0], torch.tensor(want, dtype=F64), rtol=1e-12, atol=0)
    assert eq6_variance(nn.BatchNorm1d(3), x, p) is None


@pytest.mark.parametrize("layer", [nn.Linear(10, 6), nn.Conv2d(3, 4, 3, padding=1, stride=2)], ids=["linear", "conv"])
def test_eq6_against_monte_carlo(layer):
    """Per unit, eq. 6 against the variance over 4000 real dropout masks (float64): within 10% everywhere."""
    torch.manual_seed(2)
    layer = layer.double()
    x = torch.randn(2, 10, dtype=F64) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 5, 5, dtype=F64)
    p = 0.4
    with torch.no_grad():
        draws = torch.stack([layer(F.dropout(x, p, training=True)) for _ in range(4000)])
    empirical = draws.var(dim=0)
    predicted = eq6_variance(layer, x, p)
    rel = (empirical - predicted).abs() / predicted
    assert rel.max() < 0.1 and rel.mean() < 0.04, (rel.max(), rel.mean())


@pytest.mark.parametrize("inplace", [False, True])
def test_probe_eq6_matches_empirical_on_linear_dropout_tanh(inplace):
    """With one dropout, eq. 6 and the masks measure the same noise; the first layer is not fed by dropout."""
    model = _toy(0.3, inplace)
    x = torch.randn(64, 12)
    (site,) = net_variance(model, [x], batches=1, masks=64)
    assert site.name == "3" and site.activation == "tanh" and site.fed
    assert site.dropout == "1" and site.p == pytest.approx(0.3)
    assert site.sigma == pytest.approx(site.sigma_eq6, rel=0.05)
    # and eq. 6's value is the one computed from the model's own numbers
    with torch.no_grad():
        h = model[0](x)
    want = math.sqrt(float(eq6_variance(model[2], h, 0.3).mean()))
    assert site.sigma_eq6 == pytest.approx(want, rel=1e-9)


def test_sites_not_fed_and_upstream_noise():
    """The MLP with dropout after each hidden tanh: site 1 sees no noise (exactly 0); site 7 sees its own dropout
    plus what dropout 2 passes through layer 3, so the masks measure more than eq. 6."""
    from tests.helpers import mlp

    torch.manual_seed(0)
    model = mlp(dropout=0.5, sizes=(30, 40, 40, 40, 5))
    noise = {n.name: n for n in net_variance(model, [torch.randn(32, 30)], batches=1, masks=32)}
    assert set(noise) == {"1", "4", "7"}
    assert noise["1"].sigma == 0 and not noise["1"].fed and noise["1"].sigma_eq6 is None
    assert noise["4"].fed and noise["4"].sigma == pytest.approx(noise["4"].sigma_eq6, rel=0.1)
    assert noise["7"].fed and noise["7"].sigma > 1.05 * noise["7"].sigma_eq6


def test_functional_dropout_is_measured_empirically():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.b(F.dropout(self.a(x), 0.5, self.training)))

    torch.manual_seed(0)
    (site,) = net_variance(Net(), [torch.randn(16, 8)], batches=1, masks=8)
    assert site.fed and site.sigma > 0.05 and site.sigma_eq6 is None  # no module hook: eq. 6 is not claimed


def test_the_model_and_the_rng_are_untouched():
    model = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    x = torch.randn(4, 12)
    rng = torch.random.get_rng_state()
    net_variance(model, [x], batches=1, masks=3)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in model] == [nn.Linear, nn.Dropout, nn.Linear, nn.Tanh]  # not patched


def test_batches_of():
    x = torch.randn(3, 2)
    assert [b.shape for b in batches_of(x, 5)] == [(3, 2)]  # one tensor is one batch
    pairs = [(torch.randn(2, 2), torch.zeros(2)) for _ in range(5)]
    assert len(list(batches_of(pairs, 3))) == 3
    with pytest.raises(ValueError, match="no batch"):
        list(batches_of([], 3))
    with pytest.raises(TypeError, match="tensor"):
        list(batches_of(["a"], 3))
    with pytest.raises(ValueError, match="masks"):
        net_variance(_toy(), [x], masks=1)
