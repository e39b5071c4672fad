"""The net-variance probe: how much noise dropout puts on the net ``z`` of every activation site.

Two estimates, per site:

- **empirical**: the same batch is run several times in train mode, each time with another (seeded) dropout mask;
  ``Var`` over the masks of each unit's net, averaged over units and samples. This is all the noise the site sees:
  from the dropout right before its layer and what upstream dropouts pass on through the layers between.
- **eq. 6** (Hahn & Choi), where the site's net is a ``Linear`` / ``ConvNd`` applied straight to a ``Dropout``'s
  output: ``Var(z_j) = p / (1 - p) * sum_i W_ji^2 x_i^2``. The paper writes ``p(1-p) sum (W x)^2`` for dropout
  without rescaling; PyTorch's inverted dropout multiplies kept units by ``1/(1-p)``, which gives ``p/(1-p)``. For a
  convolution the sum is the convolution of ``x^2`` with ``W^2``. It is the noise of that one dropout given its
  input (averaged over the masks of upstream dropouts), so it is at most the empirical value (law of total
  variance) and equal to it when nothing upstream drops.

The probe runs on a deep copy of the model patched with GAAF in ``exact`` mode and dropout kept (same forward, bit
for bit), so the sites and their names are exactly those the real patch will create; the model itself is not run.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SiteNoise", "net_variance", "eq6_variance", "batches_of", "FED_RTOL"]

# A site whose net moves by less than this (relative to its RMS) under dropout masks is not fed by dropout.
FED_RTOL = 1e-4


@dataclass
class SiteNoise:
    """The dropout noise on one activation site's net.

    ``sigma``: empirical standard deviation (RMS over units and samples of the per-unit std over masks);
    ``sigma_eq6``: eq. 6's, or None where the net is not a Linear/Conv of a dropout's output; ``net_rms``: the RMS
    of the net itself; ``fed``: whether dropout moves this net at all; ``dropout``/``p``: the dropout eq. 6 used;
    ``shared``: how many distinct sites carry this name (more than 1: their nets are pooled, and a shape keyed by
    the name cannot tell them apart).
    """

    name: str
    activation: str
    sigma: float
    sigma_eq6: float | None
    net_rms: float
    fed: bool
    dropout: str | None = None
    p: float | None = None
    shared: int = 1  # distinct sites reported under this name (their nets are pooled)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eq6_variance(layer: nn.Module, x: Tensor, p: float) -> Tensor | None:
    """``Var(layer(dropout(x)))`` per output unit, for inverted dropout of rate ``p`` (eq. 6); None for a layer that
    is neither ``nn.Linear`` nor a zero-padded ``nn.ConvNd``."""
    scale = p / (1.0 - p)
    x2 = x.detach().double().square()
    w2 = layer.weight.detach().double().square()
    if isinstance(layer, nn.Linear):
        return F.linear(x2, w2) * scale
    if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed and layer.padding_mode == "zeros":
        conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d if isinstance(layer, nn.Conv2d) else F.conv3d
        return conv(x2, w2, None, layer.stride, layer.padding, layer.dilation, layer.groups) * scale
    return None


def batches_of(data: Any, limit: int) -> Iterator[Tensor]:
    """The first ``limit`` input batches of ``data``: an iterable of tensors or of ``(input, target, ...)``; a single
    tensor is one batch."""
    if isinstance(data, Tensor):
        data = [data]
    n = 0
    for item in data:
        if n >= limit:
            return
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        if not isinstance(item, Tensor):
            raise TypeError(
                f"a calibration batch must be a tensor or an (input, target) pair, not {type(item).__name__}"
            )
        n += 1
        yield item
    if n == 0:
        raise ValueError("the calibration data yielded no batch")


class _Accumulator:
    """Welford over masks for one site's net, for one batch; plus the running sums over batches."""

    def __init__(self) -> None:
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.count = 0
        self.var_sum = 0.0  # sum over batches of sum over elements of Var over masks
        self.sq_sum = 0.0  # sum of z^2 (first mask) for the RMS
        self.elements = 0
        self.eq6_sum = 0.0
        self.eq6_elements = 0
        self.calls_without_eq6 = 0
        self.dropout: tuple[str, float] | None = None
        self._calls: list[Tensor] = []

    def add_call(self, z: Tensor) -> None:
        self._calls.append(z.detach().double().reshape(-1))

    def end_forward(self) -> None:
        """One forward (one mask) done: fold its nets into the Welford sums."""
        if not self._calls:
            return
        z = torch.cat(self._calls)
        self._calls = []
        self.count += 1
        if self.mean is None:
            self.mean, self.m2 = z.clone(), torch.zeros_like(z)
            self.sq_sum += float(z.square().sum())
            self.elements += z.numel()
            return
        delta = z - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (z - self.mean)

    def end_batch(self) -> None:
        if self.m2 is not None and self.count > 1:
            self.var_sum += float(self.m2.sum()) / (self.count - 1)
        self.mean = self.m2 = None
        self.count = 0


def net_variance(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    *,
    batches: int = 4,
    masks: int = 8,
    seed: int = 0,
    activations: Any = "auto",
    strip_droppath: bool = False,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[SiteNoise]:
    """Measure the dropout noise on the net of every activation site of ``model`` (which is left untouched).

    ``batches`` input batches from ``data``, each run ``masks`` times (seeds ``seed .. seed + masks - 1``) in train
    mode. DropPath stays off unless ``strip_droppath`` (then it is noise the patch removes, and is measured too).
    ``activations`` and ``filter_fn`` choose the sites, as in :func:`gaaf_patch.patch`.
    """
    from ..api import patch
    from ..modules import GAAF
    from ..passes import targets
    from ..shapes.dropout import act_spec

    if masks < 2:
        raise ValueError(f"masks must be at least 2 to measure a variance, got {masks}")
    probe = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="gaaf-patch:")
        patch(probe, activations=activations, filter_fn=filter_fn)  # exact mode: same forward; dropout kept
    probe.train()
    if not strip_droppath:
        for m in probe.modules():
            if isinstance(m, targets.DROPPATH_MODULES):
                m.eval()

    sites: dict[str, _Accumulator] = {}
    spelled: dict[str, str] = {}
    hooks = []
    live: dict[int, tuple[Tensor, Any]] = {}  # id(tensor) -> (tensor, payload): outputs of dropouts and their layers

    def on_site(name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            z = args[0]
            acc = sites[name]
            acc.add_call(z)
            found = live.get(id(z))
            if found is not None and found[0] is z and found[1][0] == "layer":
                _, var, dropout, p = found[1]
                acc.eq6_sum += float(var.sum())
                acc.eq6_elements += var.numel()
                acc.dropout = (dropout, p)
            else:
                acc.calls_without_eq6 += 1

        return hook

    def on_dropout(name: str):
        def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
            live[-id(m)] = (args[0], ("input", args[0].detach().clone() if m.inplace else args[0].detach()))

        def post(m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            x = live.pop(-id(m))[1][1]
            if m.training and 0 < m.p < 1:
                live[id(out)] = (out, ("dropout", x, name, float(m.p)))

        return pre, post

    def on_layer(m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        found = live.get(id(args[0])) if args else None
        if found is not None and found[0] is args[0] and found[1][0] == "dropout" and isinstance(out, Tensor):
            _, x, name, p = found[1]
            var = eq6_variance(m, x, p)
            if var is not None:
                live[id(out)] = (out, ("layer", var, name, p))

    seen: set[int] = set()
    shared: dict[str, int] = {}
    for m in probe.modules():
        if isinstance(m, GAAF) and id(m) not in seen and m.site is not None:
            seen.add(id(m))
            shared[m.site.name] = shared.get(m.site.name, 0) + 1
            sites.setdefault(m.site.name, _Accumulator())
            spelled[m.site.name] = act_spec(m.activation, m.params)
            hooks.append(m.register_forward_pre_hook(on_site(m.site.name)))
        elif type(m) is nn.Dropout:  # element-wise masks: eq. 6 holds (not for channel-wise or alpha dropout)
            pre, post = on_dropout(_name_of(probe, m))
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            hooks.append(m.register_forward_hook(on_layer))

    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            for batch in batches_of(data, batches):
                batch = batch.to(device)
                for k in range(masks):
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        torch.manual_seed(seed + k)
                        probe(batch)
                    live.clear()
                    for acc in sites.values():
                        acc.end_forward()
                for acc in sites.values():
                    acc.end_batch()
    finally:
        for h in hooks:
            h.remove()

    out = []
    for name, acc in sorted(sites.items()):
        if not acc.elements:
            continue  # a site this input never reached
        rms = math.sqrt(acc.sq_sum / acc.elements)
        sigma = math.sqrt(max(acc.var_sum, 0.0) / acc.elements)
        eq6 = None
        if acc.eq6_elements and acc.calls_without_eq6 == 0:
            eq6 = math.sqrt(acc.eq6_sum / acc.eq6_elements)
        fed = sigma > FED_RTOL * rms and sigma > 0
        dropout, p = acc.dropout if acc.dropout else (None, None)
        out.append(SiteNoise(name, spelled[name], sigma, eq6, rms, fed, dropout, p, shared[name]))
    return out


def _name_of(root: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in root.named_modules() if m is module), "")
