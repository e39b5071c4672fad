"""The probes against hand-computed values: eq. 5 exactly, correlations against numpy, net-value counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gaaf_patch
from gaaf_patch.analysis import (
    GradientInfo,
    NetValues,
    NodeCorrelations,
    correlation_counts,
    forward_over,
    plots,
    select,
)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and all(
        not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters()
    )


# ------------------------------------------------------------------------------------------------------ eq. 5


def test_gradient_info_is_eq5_by_hand():
    # L = sum(w . x) over the batch, so dL/dw = the column sums of x: [1, -2] then [4, 4].
    lin = nn.Linear(2, 1, bias=False)
    with GradientInfo(lin, layers=nn.Linear) as gi:
        for x in (torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 4.0], [1.0, 0.0]])):
            lin.zero_grad(set_to_none=True)
            lin(x).sum().backward()
    # step means |.|: 1.5 and 4.0; eq. 5 is their mean over the 2 steps
    assert gi.steps == 2
    assert gi.result() == {"": pytest.approx(2.75, abs=0, rel=1e-12)}
    assert _no_hooks(lin)
    lin(torch.ones(1, 2)).sum().backward()  # detached: nothing more is counted
    assert gi.steps == 2 and gi.result()[""] == pytest.approx(2.75)


def test_gradient_info_matches_autograd_reference_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gaaf_patch.patch(model)  # GAAF's gradient is what the probe must see
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = {"0": [], "2": [], "4": []}
    with GradientInfo(model) as gi:
        for _ in range(4):
            x = torch.randn(6, 5, dtype=torch.float64) * 3
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (6,)))
            grads = torch.autograd.grad(loss, [model[i].weight for i in (0, 2, 4)], retain_graph=True)
            for k, g in zip(ref, grads, strict=True):
                ref[k].append(g.abs().mean().item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    got = gi.result()
    assert list(got) == ["0", "2", "4"]  # weights only (Linear), model order; biases are not layers
    for k in ref:
        assert got[k] == pytest.approx(np.mean(ref[k]), rel=1e-12)


def test_gradient_info_reset_and_unreached_layer():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)  # frozen: not a layer to measure
    gi = GradientInfo(model)
    assert list(gi.weights) == ["1"]
    with gi:
        model(torch.ones(1, 2)).sum().backward()
        assert gi.steps == 1
        gi.reset()
        assert gi.steps == 0 and np.isnan(gi.result()["1"])


# ---------------------------------------------------------------------------------------------------- sites


def test_select_by_type_name_gaaf_and_callable():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    assert list(select(model)) == ["1", "3"]
    assert list(select(model, nn.Linear)) == ["0", "2", "4"]
    assert list(select(model, ["3", "0"])) == ["0", "3"]  # model order
    assert list(select(model, lambda n, m: n == "2")) == ["2"]
    with pytest.raises(ValueError, match="matches no module"):
        select(model, "gaaf")
    with pytest.raises(ValueError, match="no module named"):
        select(model, ["9"])
    gaaf_patch.patch(model)
    assert list(select(model, "gaaf")) == ["1", "3"] == list(select(model))


# ---------------------------------------------------------------------------------------------------- net values


def test_net_values_counts_by_hand():
    model = nn.Sequential(nn.Tanh())
    z = torch.tensor([[-3.0, -2.5, -1.0, 0.0], [1.9, 2.1, 7.0, -6.5]])
    with NetValues(model, bins=12, range=(-6, 6)) as nv:
        forward_over(model, z, batch_size=1)  # two batches
    r = nv.result()["0"]
    assert r["count"] == 8
    assert r["saturated"] == pytest.approx(5 / 8)  # -3, -2.5, 2.1, 7, -6.5
    assert (r["below"], r["above"]) == (1, 1)
    # unit bins over [-6, 6]: -3 -> [-3,-2), -2.5 -> [-3,-2), -1 -> [-1,0), 0 -> [0,1), 1.9 -> [1,2), 2.1 -> [2,3)
    expect = np.zeros(12)
    for b in (3, 3, 5, 6, 7, 8):
        expect[b] += 1
    np.testing.assert_array_equal(r["counts"], expect)
    np.testing.assert_allclose(r["edges"], np.arange(-6, 7))
    assert r["mean"] == pytest.approx(z.double().mean().item())
    assert r["std"] == pytest.approx(z.double().std().item())
    assert _no_hooks(model)


def test_net_values_custom_saturation_and_patched_sites_agree():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(50, 4)
    with NetValues(model, saturation=lambda z: z < 0) as before:
        forward_over(model, x)
    pre = model[0](x)
    assert before.result()["1"]["saturated"] == pytest.approx((pre < 0).float().mean().item())
    gaaf_patch.patch(model)  # exact mode: same nets at the same (now GAAF) site
    with NetValues(model, "gaaf", saturation=lambda z: z < 0) as after:
        forward_over(model, x)
    np.testing.assert_array_equal(before.result()["1"]["counts"], after.result()["1"]["counts"])


def test_forward_over_restores_training_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Tanh())
    model.train()
    with NodeCorrelations(model) as nc:
        forward_over(model, torch.randn(10, 2))
    assert model.training and nc.result()["2"]["samples"] == 10


# ---------------------------------------------------------------------------------------------------- correlations


def test_correlations_match_numpy():
    g = torch.Generator().manual_seed(3)
    n, d = 300, 6
    base = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5 + 100.0  # a large mean: shifted sums must cope
    x[:, 1] += 3 * base[:, 0]
    x[:, 2] += 3 * base[:, 0]  # 1 and 2 strongly correlated
    x[:, 3] -= 2 * base[:, 0]  # anti-correlated with them
    x[:, 4] += base[:, 1]
    model = nn.Sequential(nn.Identity())
    with NodeCorrelations(model, nn.Identity) as nc:
        forward_over(model, x, batch_size=77)
    r = nc.result()["0"]
    ref = np.corrcoef(x.numpy(), rowvar=False)
    np.testing.assert_allclose(r["corr"], ref, rtol=0, atol=1e-9)
    assert (r["nodes"], r["samples"], r["pairs"], r["constant"]) == (6, 300, 15, 0)
    iu = np.triu_indices(d, 1)
    assert r["counts"] == {f"{t:g}": int((ref[iu] > t).sum()) for t in (0.9, 0.8, 0.7, 0.6, 0.5)}
    assert r["counts"]["0.9"] >= 1  # the 1-2 pair
    absolute = correlation_counts(r["corr"], (0.9,), absolute=True)["0.9"]
    assert absolute == int((np.abs(ref[iu]) > 0.9).sum()) > r["counts"]["0.9"]  # the anti-correlated pairs
    np.testing.assert_allclose(np.sort(r["values"]), np.sort(ref[iu]), atol=1e-9)


def test_correlations_constant_node_and_channels():
    x = torch.randn(40, 3, 2, 2)
    x[:, 1] = 0.0  # a dead channel
    model = nn.Sequential(nn.ReLU())
    with NodeCorrelations(model) as nc:
        forward_over(model, x)
    r = nc.result()["0"]
    assert (r["nodes"], r["samples"], r["constant"]) == (3, 160, 1)  # channels are nodes, positions are samples
    assert np.isnan(r["corr"][1]).all() and len(r["values"]) == 1  # only the 0-2 pair is defined
    y = x.relu().movedim(1, -1).reshape(-1, 3).numpy()
    assert r["values"][0] == pytest.approx(np.corrcoef(y[:, 0], y[:, 2])[0, 1], abs=1e-9)


def test_correlations_need_two_samples():
    model = nn.Sequential(nn.Tanh())
    with NodeCorrelations(model) as nc:
        forward_over(model, torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        nc.result()


# ---------------------------------------------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    h = {"counts": np.array([1, 5, 2]), "edges": np.array([-3.0, -1.0, 1.0, 3.0]), "saturated": 0.1}
    plots.net_histograms({"a": {"s": h}, "b": {"s": h}}, path=tmp_path / "n.png")
    plots.gradient_info({"a": {"layer1": 1e-4, "layer2": 2e-4}}, reference={"a": {"layer1": 2e-4}},
                        path=tmp_path / "g.png")  # fmt: skip
    plots.correlation_histograms({"a": {"s": plots.histogram(np.array([0.1, 0.9, -0.3]))}}, path=tmp_path / "c.png")
    for name in ("n.png", "g.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
