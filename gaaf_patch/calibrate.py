"""``gaaf_patch.calibrate``: strip dropout and give each site the gradient that dropout actually induced there.

The paper picks one shape per activation by hand and leaves open how to reshape it "according to the dropout rate".
Here the shape follows from the dropout: before the dropouts are stripped, :func:`gaaf_patch.analysis.net_variance`
measures the noise ``sigma`` they put on the net of every activation site (empirically with several masks; eq. 6
where the net is a Linear/Conv of a dropout's output), and each site fed by dropout gets the dropout-matched shape
``s_sigma(x) = max(0, E[phi'(x + eps)] - phi'(x))``, ``eps ~ N(0, sigma^2)`` (:mod:`gaaf_patch.shapes.dropout`).
Sites that no dropout reaches keep their default shape. docs/calibration.md has the derivation and the results.

::

    model = gaaf.calibrate(dropout_model, train_batches)    # in place; returns the model
    gaaf.report(model).replaced                            # shape "dropout_matched(act='tanh', sigma=0.412)"

    batches = load_batches("digits", (1, 28, 28))          # what ``gaaf-patch --calibrate digits`` measures on
    rows = calibrate_on(dropout_model, batches)            # the same, returning the noise and shape per site
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activations as _acts
from .analysis.variance import SiteNoise, net_variance
from .api import PatchError, patch
from .errors import GaafError, one_line
from .passes.context import RECORD_ATTR
from .shapes import ShapeFn, dropout_matched

__all__ = [
    "calibrate",
    "calibrate_from",
    "calibrate_on",
    "CalibrationError",
    "calibrated_shapes",
    "load_batches",
    "noise_table",
    "ESTIMATORS",
    "SIGMA_DIGITS",
]

ESTIMATORS = ("empirical", "eq6")
SIGMA_DIGITS = 3  # sigma is rounded to 3 significant digits: a readable spec, and one cached table per value


class CalibrationError(GaafError, ValueError):
    """An estimator, or calibration data, that calibration cannot use; the message says what to give instead."""


def calibrated_shapes(noise: Sequence[SiteNoise], *, estimator: str = "empirical") -> dict[str, ShapeFn]:
    """``{site name: dropout-matched shape}`` for the sites that dropout feeds.

    ``estimator``: ``"empirical"`` (all the noise the site sees) or ``"eq6"`` (eq. 6 where the site's net is a
    Linear/Conv of a dropout's output; the empirical value elsewhere).
    """
    if estimator not in ESTIMATORS:
        raise CalibrationError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    shapes = {}
    for site in noise:
        if not site.fed:
            continue
        if site.shared > 1:
            warnings.warn(
                f"gaaf-patch: calibrate: {site.shared} sites share the name {site.name!r}; a shape is chosen by site "
                "name, so they keep their default shape",
                stacklevel=2,
            )
            continue
        sigma = site.sigma_eq6 if estimator == "eq6" and site.sigma_eq6 is not None else site.sigma
        shapes[site.name] = dropout_matched(site.activation, float(f"{sigma:.{SIGMA_DIGITS}g}"))
    return shapes


def _literal(name: str) -> str:
    """A shapes-key pattern that matches exactly the site ``name`` (and is not mistaken for an activation name)."""
    pattern = "".join(f"[{c}]" if c in "*?[" else c for c in name)
    return f"[{pattern[0]}]{pattern[1:]}" if pattern in _acts.ACTIVATIONS else pattern


def calibrate_from(
    model: nn.Module, noise: Sequence[SiteNoise], *, estimator: str = "empirical", **patch_options: Any
) -> nn.Module:
    """Patch ``model`` in place with dropout stripped and the shapes :func:`calibrated_shapes` derives from
    ``noise`` (a measurement of this model by :func:`gaaf_patch.analysis.net_variance`); returns ``model``.

    ``patch_options`` are :func:`gaaf_patch.patch`'s. A ``shapes`` pattern given there (``"layer4.*"``) wins over
    calibration at the sites it matches; a shape given per activation name applies only to sites not fed by dropout.
    """
    if patch_options.pop("strip_dropout", True) is not True:
        raise PatchError("calibrate strips dropout (that is what it calibrates against); drop strip_dropout=False")
    user = dict(patch_options.pop("shapes", None) or {})
    patterns = {k: v for k, v in user.items() if k not in _acts.ACTIVATIONS}
    by_activation = {k: v for k, v in user.items() if k in _acts.ACTIVATIONS}
    calibrated = {
        key: shape
        for key, shape in ((_literal(n), s) for n, s in calibrated_shapes(noise, estimator=estimator).items())
        if key not in patterns
    }
    if not any(n.fed for n in noise):
        warnings.warn(
            "gaaf-patch: calibrate: no activation site is fed by dropout; every site keeps its default shape",
            stacklevel=2,
        )
    shapes = {**patterns, **calibrated, **by_activation}
    # the calibrated shape is dropout's own excess gradient, so it is added as measured (the paper's gain)
    return patch(model, strip_dropout=True, shapes=shapes, **{"gain": "paper", **patch_options})


def calibrate(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    *,
    batches: int = 4,
    masks: int = 8,
    seed: int = 0,
    estimator: str = "empirical",
    **patch_options: Any,
) -> nn.Module:
    """Patch ``model`` in place like ``gaaf.patch(model, strip_dropout=True)``, with each site's shape derived from
    the dropout that fed it; returns ``model``.

    ``data``: input batches (or ``(input, target)`` pairs), e.g. a DataLoader; the first ``batches`` are each run
    ``masks`` times with different dropout masks (seeded from ``seed``) on a copy of the model, in train mode, to
    measure the noise. ``patch_options``: those of :func:`gaaf_patch.patch` (``activations``, ``shapes``, ``mode``,
    ``K``, ``strip_droppath``, ``filter_fn``). The sigma of each site is in its shape's spec, which
    ``gaaf.report(model)`` lists and a saved patch configuration replays.
    """
    noise = _measure(model, data, batches, masks, seed, patch_options)
    return calibrate_from(model, noise, estimator=estimator, **patch_options)


def calibrate_on(
    model: nn.Module,
    batches: Sequence[Tensor],
    *,
    masks: int = 8,
    seed: int = 0,
    estimator: str = "empirical",
    **patch_options: Any,
) -> list[dict[str, Any]]:
    """:func:`calibrate` on every batch of ``batches`` (e.g. from :func:`load_batches`), returning what it measured:
    one :func:`noise_table` row per site, with the shape the site got (``None``: its default shape)."""
    noise = _measure(model, batches, len(batches), masks, seed, patch_options)
    calibrate_from(model, noise, estimator=estimator, **patch_options)
    return noise_table(noise, calibrated_shapes(noise, estimator=estimator))


def _measure(
    model: nn.Module, data: Iterable[Any] | Tensor, batches: int, masks: int, seed: int, patch_options: dict[str, Any]
) -> list[SiteNoise]:
    """The dropout noise on the sites ``patch_options`` choose, measured on the unpatched ``model``."""
    if RECORD_ATTR in model.__dict__:
        raise PatchError("calibrate takes the unpatched dropout model; call gaaf_patch.unpatch(model) first")
    return net_variance(
        model,
        data,
        batches=batches,
        masks=masks,
        seed=seed,
        activations=patch_options.get("activations", "auto"),
        strip_droppath=patch_options.get("strip_droppath", False),
        filter_fn=patch_options.get("filter_fn"),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Calibration data for the command line: a named data set or a tensor file, fitted to the model's input.


def load_batches(
    source: str,
    input_size: Sequence[int],
    *,
    batch_size: int = 16,
    batches: int = 2,
    data_dir: str | None = None,
) -> list[Tensor]:
    """``batches`` batches of ``batch_size`` inputs of per-sample shape ``input_size`` from ``source``.

    ``source``: ``digits`` (scikit-learn's 8x8 digits), ``mnist`` (from ``data_dir``; never downloaded here) or a
    ``.pt`` file holding a tensor of inputs (or an ``(inputs, targets)`` pair). Images are resized to the model's
    ``H x W`` and repeated to its channels; a flat input of ``D = k^2`` features takes ``k x k`` images, flattened.
    Pixel values stay in [0, 1]: for a model trained on normalised inputs, give a ``.pt`` file of real inputs.
    """
    from . import data

    if source == "digits":
        images = data.digits().images
    elif source == "mnist":
        images = data.mnist(data_dir, train=True, download=False).images
    elif Path(source).is_file():
        images = _tensor_file(Path(source))
    else:
        raise CalibrationError(
            f"calibration data {source!r}: use digits, mnist (with --data-dir) or a .pt file of inputs"
        )
    images = images[: batch_size * batches]
    fitted = _fit(images.float(), tuple(input_size), source)
    return list(fitted.split(batch_size))


def _tensor_file(path: Path) -> Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CalibrationError(f"cannot read {path} as a torch file: {one_line(e, 200)}") from e
    if isinstance(obj, (tuple, list)) and obj:
        obj = obj[0]
    if not isinstance(obj, Tensor) or obj.dim() < 2 or not obj.is_floating_point():
        raise CalibrationError(f"{path} must hold a float tensor of inputs N x ... (or an (inputs, targets) pair)")
    return obj


def _fit(images: Tensor, input_size: tuple[int, ...], source: str) -> Tensor:
    """``images`` (N x ...) made to the per-sample ``input_size``."""
    if tuple(images.shape[1:]) == input_size:
        return images
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise CalibrationError(
            f"{source}: inputs of shape {list(images.shape[1:])} do not fit the model's {list(input_size)}"
        )
    if len(input_size) == 1:
        side = math.isqrt(input_size[0] // images.shape[1])
        if side * side * images.shape[1] != input_size[0]:
            raise CalibrationError(f"{source}: images cannot be flattened to {input_size[0]} features (not C x k x k)")
        return _resize(images, side, side).flatten(1)
    if len(input_size) == 3:
        c, h, w = input_size
        images = _resize(images, h, w)
        if images.shape[1] == c:
            return images
        if images.shape[1] == 1:
            return images.expand(-1, c, -1, -1).contiguous()
    raise CalibrationError(f"{source}: images {list(images.shape[1:])} do not fit the model's input {list(input_size)}")


def _resize(images: Tensor, h: int, w: int) -> Tensor:
    if images.shape[-2:] == (h, w):
        return images
    return F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def noise_table(noise: Sequence[SiteNoise], shapes: Mapping[str, ShapeFn]) -> list[dict[str, Any]]:
    """One row per measured site: the noise and the shape it got (for the report and the CLI)."""
    return [{**n.to_dict(), "shape": shapes[n.name].spec if n.name in shapes else None} for n in noise]
