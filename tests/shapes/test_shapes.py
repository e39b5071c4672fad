"""The shape-function registry and the built-in shapes: behaviour, paper values, references, decay, gradients."""

from __future__ import annotations

import math

import pytest
import torch

import gaaf_patch
from gaaf_patch import shapes
from gaaf_patch.activations import ACTIVATIONS
from gaaf_patch.shapes import ShapeFn, available, get, register, resolve
from gaaf_patch.shapes import registry as _registry

F64 = torch.float64
FAMILIES = ("gauss", "shifted_sigmoid", "band", "zero")
PAPER_AND_KERAS = ("tanh", "relu", "tanh_keras", "relu_keras")
# The brief's list; ACTIVATIONS may hold more (celu, ...), every one of which must have a default too.
NAMED_DEFAULTS = (
    "relu relu6 leaky_relu elu selu gelu silu mish softplus tanh hardtanh sigmoid hardsigmoid hardswish".split()
)
DEFAULTS = sorted(set(NAMED_DEFAULTS) | set(ACTIVATIONS))


@pytest.fixture
def clean_registry():
    """Registrations made by a test are undone after it."""
    saved = dict(_registry._REGISTRY)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)


# --------------------------------------------------------------------------------------------------------------------
# Hand-written float64 references, independent of the library's formulas (1/(1+exp(-z)) rather than torch.sigmoid).


def _sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _relu_like(x):
    return _sig(5.0 * (x + 0.5))


REFERENCE = {
    "gauss": lambda x: torch.exp(-(x**2) / 4.0),
    "shifted_sigmoid": _relu_like,
    "band": lambda x: _sig(5.0 * (x + 0.5)) * _sig(5.0 * (6.5 - x)),
    "zero": lambda x: torch.zeros_like(x),
    # the paper's two (read off its Figure 4) and the Keras port's variants
    "tanh": lambda x: torch.exp(-(x**2) / 4.0),
    "relu": _relu_like,
    "tanh_keras": lambda x: torch.exp(-(x**2) / 3.0),
    "relu_keras": lambda x: _sig(x + 4.0),
    # ours
    "leaky_relu": _relu_like,
    "elu": _relu_like,
    "selu": _relu_like,
    "celu": _relu_like,
    "gelu": _relu_like,
    "silu": _relu_like,
    "quick_gelu": _relu_like,
    "relu2": lambda x: torch.exp(-((x + 1.5) ** 2)),  # a bump on the saturated side only
    "mish": _relu_like,
    "softplus": _relu_like,
    "hardswish": lambda x: _sig(5.0 * (x + 3.5)),
    "relu6": lambda x: _sig(5.0 * (x + 0.5)) * _sig(5.0 * (6.5 - x)),
    "hardtanh": lambda x: torch.exp(-(x**2) / 4.0),
    # sigmoid(x) = (1 + tanh(x/2))/2: tanh's shape at x/2, times 1/4
    "sigmoid": lambda x: 0.25 * torch.exp(-((x / 2.0) ** 2) / 4.0),
    # hardsigmoid(x) = (1 + hardtanh(x/3))/2: hardtanh's shape at x/3, times 1/6
    "hardsigmoid": lambda x: torch.exp(-((x / 3.0) ** 2) / 4.0) / 6.0,
}

BUILTINS = sorted(set(FAMILIES) | set(PAPER_AND_KERAS) | set(DEFAULTS))
X = torch.cat([torch.linspace(-12.0, 12.0, 961, dtype=F64), torch.tensor([-0.5, 0.0, 0.5, -3.0, 3.0, 6.0], dtype=F64)])


def test_reference_table_covers_every_builtin():
    assert set(BUILTINS) <= set(REFERENCE), sorted(set(BUILTINS) - set(REFERENCE))
    assert set(BUILTINS) <= set(available())


# --------------------------------------------------------------------------------------------------------------------
# Registry behaviour


def test_available_is_sorted_and_lists_families_paper_keras_and_defaults():
    names = available()
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in (*FAMILIES, *PAPER_AND_KERAS, *DEFAULTS):
        assert name in names
    assert shapes.library.PAPER == ("tanh", "relu")
    assert shapes.library.KERAS == ("tanh_keras", "relu_keras")


def test_register_as_decorator(clean_registry):
    @register("bump_t", width=2, height=1.5)
    def bump(x, width, height):
        """A test bump."""
        return height * torch.exp(-x * x / width)

    assert bump(torch.tensor(0.0), 2.0, 1.5).item() == 1.5  # the decorator hands the function back unchanged
    s = get("bump_t")
    assert isinstance(s, ShapeFn)
    assert s.name == s.family == "bump_t"
    assert s.params == {"width": 2.0, "height": 1.5}
    assert all(type(v) is float for v in s.params.values())  # ints stored as floats: the spec prints 2.0
    assert s.doc == "A test bump."
    x = torch.linspace(-3, 3, 13, dtype=F64)
    torch.testing.assert_close(s(x), 1.5 * torch.exp(-x * x / 2.0), rtol=0, atol=0)
    assert "bump_t" in available()
    assert get("bump_t(width=0.5)")(torch.tensor(1.0, dtype=F64)).item() == pytest.approx(1.5 * math.exp(-2.0))


def test_register_with_fn_argument(clean_registry):
    def ramp(x, a):
        return a * x

    assert register("ramp_t", ramp, a=3.0) is ramp
    assert get("ramp_t")(torch.tensor([2.0])).item() == 6.0


def test_register_member_of_a_family(clean_registry):
    member = register("narrow_t", family="gauss", width=1, height=2.0)
    assert isinstance(member, ShapeFn)
    assert get("narrow_t") is member
    assert member.name == "narrow_t" and member.family == "gauss"
    assert member.params == {"width": 1.0, "center": 0.0, "scale": 1.0, "height": 2.0}
    x = torch.linspace(-4, 4, 17, dtype=F64)
    torch.testing.assert_close(member(x), 2.0 * torch.exp(-x * x), rtol=1e-13, atol=0)
    # a member of a member is a member of the underlying family
    sub = register("narrower_t", family="narrow_t", width=0.5)
    assert sub.family == "gauss" and sub.params["height"] == 2.0 and sub.params["width"] == 0.5


def test_register_member_rejects_unknown_params_at_registration(clean_registry):
    with pytest.raises(ValueError, match="bogus"):
        register("bad_t", family="gauss", bogus=1.0)
    assert "bad_t" not in available()
    with pytest.raises(KeyError):
        register("bad_t", family="no_such_family")
    with pytest.raises(TypeError):
        register("bad_t", lambda x: x, family="gauss")


def test_unknown_name_raises_keyerror_with_known_names_and_close_matches():
    with pytest.raises(KeyError) as e:
        get("gaus")
    msg = str(e.value)
    assert "gaus" in msg and "did you mean" in msg and "gauss" in msg.split("did you mean")[1].split(";")[0]
    for name in available():
        assert name in msg.split("known:")[1]
    with pytest.raises(KeyError) as e:
        get("relu_kera")
    assert "relu_keras" in str(e.value).split("known:")[0]
    with pytest.raises(KeyError) as e:
        get("qqqqqqqq")
    assert "did you mean" not in str(e.value) and "known:" in str(e.value)
    with pytest.raises(KeyError):
        get("qqqqqqqq(width=3)")  # a parameter list does not hide the unknown name


def test_get_parses_parameter_spelling():
    s = get("gauss(width=3)")
    assert s.family == "gauss" and s.params["width"] == 3.0 and type(s.params["width"]) is float
    assert s.params["center"] == 0.0 and s.params["scale"] == 1.0  # the rest keep the family defaults
    assert s == get("tanh_keras")
    x = torch.linspace(-5, 5, 21, dtype=F64)
    torch.testing.assert_close(s(x), torch.exp(-x * x / 3.0), rtol=1e-13, atol=0)
    two = get("  shifted_sigmoid ( slope = 2.5 , shift=-1 )  ")
    assert two.params == {"slope": 2.5, "shift": -1.0, "height": 1.0}
    assert get("band()") == get("band")
    # parameters on top of an activation's default, and keyword overrides on top of a spelling
    assert get("tanh(width=3)") == get("tanh_keras")
    assert get("tanh", width=3) == get("tanh_keras")
    assert get("gauss(width=2)", width=3) == get("tanh_keras")
    assert get(get("tanh_keras")) is get("tanh_keras")
    assert get(get("tanh"), width=3) == get("tanh_keras")


@pytest.mark.parametrize(
    "bad",
    ["gauss(3)", "gauss(width=abc)", "gauss(width=", "1gauss", "gauss(width=3)(x)", "gauss(**{'width': 3})", ""],
)
def test_get_rejects_malformed_spellings(bad):
    with pytest.raises(ValueError, match="shape"):
        get(bad)


@pytest.mark.parametrize("name", BUILTINS)
def test_spec_round_trips(name):
    s = get(name)
    back = get(s.spec)
    assert back == s
    assert back.family == s.family and dict(back.params) == dict(s.params)
    torch.testing.assert_close(back(X), s(X), rtol=0, atol=0)
    assert s.spec.startswith(f"{s.family}(") and s.spec.endswith(")")
    assert s.spec in repr(s)


def test_spec_spelling_reads_like_the_formula():
    assert get("tanh_keras").spec == "gauss(width=3.0)"
    assert get("relu_keras").spec == "shifted_sigmoid(slope=1.0, shift=4.0)"
    assert repr(get("relu_keras")) == "relu_keras: shifted_sigmoid(slope=1.0, shift=4.0)"
    assert get("zero").spec == "zero()"
    for name in ("tanh", "gauss"):  # the formula's own parameter is shown, neutral offset/scale/height are not
        assert "width=4.0" in get(name).spec and "center" not in get(name).spec and "height" not in get(name).spec
    assert "scale=2.0" in get("sigmoid").spec and "height=0.25" in get("sigmoid").spec


def test_spec_round_trips_changed_params():
    for s in (get("relu", slope=2.5, height=0.3), get("band", lo=-1, hi=1), get("sigmoid", height=1 / 3)):
        assert get(s.spec) == s
        torch.testing.assert_close(get(s.spec)(X), s(X), rtol=0, atol=0)
    assert "lo=-1.0" in get("band", lo=-1, hi=1).spec and "hi=1.0" in get("band", lo=-1, hi=1).spec
    assert get("gauss", center=0.0, height=1.0) == get("gauss")


def test_spec_round_trips_for_a_family_whose_defaults_are_not_neutral(clean_registry):
    @register("bump_t", width=2.0, height=0.5, center=1.0)
    def bump(x, width, height, center):
        return height * torch.exp(-((x - center) ** 2) / width)

    for s in (get("bump_t"), get("bump_t", height=1.0), get("bump_t", center=0.0), get("bump_t", height=1, center=0)):
        back = get(s.spec)
        assert back == s, (s.spec, back.params)
        torch.testing.assert_close(back(X), s(X), rtol=0, atol=0)


def test_equality_is_by_function_not_name():
    assert get("tanh") == get("hardtanh") == get("gauss")
    assert get("tanh") != get("tanh_keras")
    assert get("relu") != get("relu_keras")
    assert get("relu") != get("gauss")


def test_with_params_rejects_unknown_and_does_not_mutate():
    s = get("relu")
    with pytest.raises(ValueError, match="width") as e:
        s.with_params(width=3.0)
    assert "slope" in str(e.value)  # says what it takes
    with pytest.raises(ValueError):
        get("zero").with_params(height=1.0)
    with pytest.raises(ValueError):
        get("gauss(widht=3)")
    t = s.with_params(slope=2)
    assert t.params["slope"] == 2.0 and type(t.params["slope"]) is float
    assert s.params["slope"] == 5.0 and get("relu").params["slope"] == 5.0
    assert t.family == "shifted_sigmoid"


def test_resolve_wraps_callables_and_rejects_others():
    def twice(x):
        return 2 * torch.ones_like(x)

    s = resolve(twice)
    assert isinstance(s, ShapeFn) and s.name == "<twice>"
    assert torch.equal(s(torch.zeros(3)), torch.full((3,), 2.0))
    assert resolve("tanh") is get("tanh")
    assert resolve(get("relu")) is get("relu")
    with pytest.raises(TypeError):
        resolve(3.0)


# --------------------------------------------------------------------------------------------------------------------
# The built-in shapes


@pytest.mark.parametrize("name", DEFAULTS)
def test_every_activation_has_a_default(name):
    s = get(name)
    assert isinstance(s, ShapeFn)
    assert s.family in FAMILIES
    v = s(X)
    assert v.dtype == F64 and v.shape == X.shape
    assert torch.isfinite(v).all() and (v >= 0).all()
    if name != "zero":
        assert v.max() > 0.1 * v.new_tensor(1.0 / 6.0)  # a default really adds gradient somewhere


@pytest.mark.parametrize("name", BUILTINS)
def test_fast_path_facts_hold(name):
    """A family's FastPath against its own formula: the in-place term is h s~ = s (and writes into x only when it
    owns it), ``zero`` means 0 everywhere, ``zero_at_infinity`` 0 exactly at +-inf; the kernel takes 5 constants."""
    s = get(name)
    fast = s.fast
    assert fast is not None and fast is get(s.family).fast
    x = X.clone()
    if fast.term is not None:
        for owned in (False, True):
            work = x.clone()
            term, h = fast.term(work, owned, s.params)
            got = torch.zeros_like(x) if term is None else term * h
            torch.testing.assert_close(got, s(x), rtol=1e-13, atol=1e-300)
            assert owned or torch.equal(work, x)
    if fast.zero:
        assert not s(x).any()
    if fast.zero_at_infinity:
        assert s(torch.tensor([-math.inf, math.inf], dtype=F64)).tolist() == [0.0, 0.0]
    if fast.kernel is not None:
        code, *constants = fast.kernel(s.params)
        assert isinstance(code, int) and len(constants) == 4 and all(isinstance(c, float) for c in constants)


def test_user_shapes_have_no_fast_path():
    assert resolve(lambda t: t * 0).fast is None
    assert ShapeFn("mine", lambda x: x * 0).fast is None


def test_paper_tanh_shape_values():
    s = get("tanh")
    for x, want in [(0, 1.0), (1, 0.78), (2, 0.37), (3, 0.105)]:
        for sign in (1, -1):
            got = s(torch.tensor(sign * x, dtype=F64)).item()
            assert got == pytest.approx(want, abs=0.01)
            assert got == pytest.approx(math.exp(-(x**2) / 4), rel=1e-13)
    assert s.params["width"] == 4.0


def test_paper_relu_shape_values():
    s = get("relu")
    assert s(torch.tensor(-0.5, dtype=F64)).item() == 0.5
    assert (s(torch.linspace(0.5, 20, 100, dtype=F64)) > 0.99).all()
    assert (s(torch.linspace(-60, -1.5, 100, dtype=F64)) < 0.01).all()
    v = s(X)
    assert (v[:961].diff() >= 0).all()  # monotone
    assert s(torch.tensor(0.0, dtype=F64)).item() == pytest.approx(1 / (1 + math.exp(-2.5)), rel=1e-13)


def test_keras_variants():
    x = torch.linspace(-8, 8, 161, dtype=F64)
    torch.testing.assert_close(get("tanh_keras")(x), torch.exp(-x * x / 3), rtol=1e-13, atol=0)
    torch.testing.assert_close(get("relu_keras")(x), 1 / (1 + torch.exp(-(x + 4))), rtol=1e-13, atol=0)
    # the Keras tanh variant is narrower than the paper's, the Keras ReLU variant reaches much further left
    away = x[x.abs() > 0.05]
    assert (get("tanh_keras")(away) < get("tanh")(away)).all()
    assert get("relu_keras")(torch.tensor(-4.0, dtype=F64)).item() == 0.5


@pytest.mark.parametrize("name", BUILTINS)
def test_shape_matches_float64_reference(name):
    torch.testing.assert_close(get(name)(X), REFERENCE[name](X), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "spec, ref",
    [
        ("gauss(width=2, center=1, scale=0.5, height=3)", lambda x: 3 * torch.exp(-(((x - 1) / 0.5) ** 2) / 2)),
        ("shifted_sigmoid(slope=2, shift=-1, height=0.5)", lambda x: 0.5 * _sig(2 * (x - 1))),
        ("band(lo=-1, hi=1, slope=3, margin=0.25)", lambda x: _sig(3 * (x + 1.25)) * _sig(3 * (1.25 - x))),
    ],
)
def test_family_parameters_match_reference(spec, ref):
    torch.testing.assert_close(get(spec)(X), ref(X), rtol=1e-13, atol=1e-15)


def test_zero_shape_is_zero_for_any_input():
    for dtype in (F64, torch.float32, torch.float16, torch.bfloat16):
        x = X.to(dtype)
        v = get("zero")(x)
        assert v.dtype == dtype and v.shape == x.shape and not v.any()


# Where each activation saturates far away: (left, right); None where it does not saturate on that side.
FAR = {
    **{a: (-10.0, None) for a in "relu leaky_relu elu selu celu gelu silu quick_gelu mish softplus hardswish".split()},
    "relu6": (-10.0, 16.0),
    "relu2": (-10.0, 10.0),  # its bump sits on the saturated side only
    "tanh": (-10.0, 10.0),
    "hardtanh": (-10.0, 10.0),
    "sigmoid": (-10.0, 10.0),
    "hardsigmoid": (-20.0, 20.0),  # hardtanh(x/3) rescaled: its saturation starts at |x| = 3, not 1
}


def test_far_table_covers_every_activation():
    assert set(DEFAULTS) <= set(FAR)


@pytest.mark.parametrize("name", DEFAULTS)
def test_default_decays_in_far_saturation(name):
    s = get(name)
    left, right = FAR[name]
    far_left = torch.linspace(left, 6 * left, 50, dtype=F64)
    assert (s(far_left) < 1e-3).all()
    assert s(torch.tensor(-1e4, dtype=F64)).item() < 1e-12
    if right is None:
        assert s(torch.tensor(1e4, dtype=F64)).item() > 0.99  # one-sided: the active side keeps its boost
    else:
        assert (s(torch.linspace(right, 6 * right, 50, dtype=F64)) < 1e-3).all()
        assert s(torch.tensor(1e4, dtype=F64)).item() < 1e-12


def test_keras_variants_decay_too():
    assert get("relu_keras")(torch.tensor(-12.0, dtype=F64)).item() < 1e-3
    assert get("tanh_keras")(torch.tensor([-10.0, 10.0], dtype=F64)).max().item() < 1e-3


@pytest.mark.parametrize("name", [n for n in BUILTINS if n != "zero"])
def test_shape_gradcheck_float64(name):
    s = get(name)
    x = (torch.linspace(-7.3, 7.1, 23, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(s, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shape_keeps_dtype_and_shape(name, dtype):
    x = X[:60].reshape(3, 4, 5).to(dtype).transpose(0, 2)
    v = get(name)(x)
    assert v.dtype == dtype and v.shape == x.shape
    assert torch.isfinite(v).all()


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("gauss(width=-1)", "width must be > 0"),
        ("gauss(width=0)", "width must be > 0"),
        ("gauss(width='abc')", "width must be a finite number"),
        ("gauss(scale=0)", "scale must not be 0"),
        ("band(lo=6, hi=0)", "lo must be below hi"),
        ("shifted_sigmoid(slope=True)", "slope must be a finite number"),
    ],
)
def test_parameters_that_make_no_shape_are_refused_when_the_shape_is_made(spec, problem):
    """Issue 14, item 7: gauss(width=-1) used to give gradients of 1e29, width=0 a ZeroDivisionError in backward."""
    with pytest.raises(ValueError, match=problem):
        get(spec)
    with pytest.raises(gaaf_patch.PatchError, match=problem):
        gaaf_patch.patch(torch.nn.Sequential(torch.nn.ReLU()), shapes={"relu": spec})


def test_the_cli_refuses_a_bad_shape_in_one_line(capsys):
    from gaaf_patch.cli import main

    assert main(["tv:resnet18", "--input-size", "3,32,32", "--shape", "relu=gauss(width=-1)"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gaaf-patch: error: shape gauss(width=-1): width must be > 0"]


def test_a_registered_name_is_not_overwritten_silently(clean_registry):
    """Issue 14, item 13: register silently replaced a name, built-ins included (every saved config naming it
    would then replay another shape)."""
    from gaaf_patch.errors import GaafError

    tanh = get("tanh")
    for name in ("tanh", "gauss", "relu_keras", "dropout_matched"):
        with pytest.raises(shapes.ShapeError, match=f"'{name}' is one of gaaf_patch's own shapes"):
            register(name, family="gauss", width=1.0, replace=True)  # never, even when asked
    assert get("tanh") is tanh
    with pytest.raises(shapes.ShapeError, match="cannot be replaced"):

        @register("gauss", width=1.0)
        def fake(x, width):
            return x

    assert get("gauss")(torch.tensor([0.0])).item() == 1.0
    register("mine_t", family="gauss", width=2.0)
    with pytest.raises(shapes.ShapeError, match=r"'mine_t' is already registered \(gauss\(width=2.0\)\); pass replace"):
        register("mine_t", family="gauss", width=3.0)
    assert get("mine_t").params["width"] == 2.0
    assert register("mine_t", family="gauss", width=3.0, replace=True).params["width"] == 3.0
    assert issubclass(shapes.ShapeError, GaafError) and issubclass(shapes.ShapeError, ValueError)
