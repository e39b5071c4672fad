"""The pass contract: every pass returns a PatchPassResult, the pass manager records it, and what it says it did
matches a count taken without it (walking ``model.modules()``, reading the forward's source).

Also the one gate rule (``passes.gates.reaches_mul``) on hand-built graphs, and the record's pickling.
"""

from __future__ import annotations

import ast
import inspect
import io
import operator
import pickle
import textwrap

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

import gaaf_patch
from gaaf_patch import GAAF, PatchConfig, StrippedDropout, gain
from gaaf_patch.backend import GAAFPass
from gaaf_patch.passes import PASSES, RECORD_ATTR, Context, PatchPassResult, PatchRecord, combine, reaches_mul, run
from gaaf_patch.passes.gates import MAX_DEPTH
from gaaf_patch.passes.runtime import PatchedForward

ORDER = ["dropout", "functional", "modules", "budget", "fuse"]
ACTIVATION_MODULES = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid)  # the classes the toys below use


class Hand(nn.Module):
    """Known sites: 3 ``F.relu`` and 1 ``torch.tanh`` call, 2 activation modules (one registered twice), 1 dropout
    module, 1 ``F.dropout`` call, 1 BatchNorm feeding a ReLU."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.act = nn.GELU()
        self.block = nn.Sequential(nn.Linear(d, d), self.act)  # the same GELU, a second registration
        self.out_act = nn.Tanh()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.l1(x)))
        x = F.relu(self.l2(x)) + F.relu(x)
        x = self.block(self.act(x))
        x = F.dropout(self.drop(x), 0.1, self.training)
        return self.out_act(self.l3(torch.tanh(x)))


def _calls_in_forward(cls: type, names: set[str]) -> int:
    """Calls ``<anything>.<name>(...)`` in ``cls.forward``'s source: an independent count of functional sites."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    return sum(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in names for n in ast.walk(tree)
    )


def _unique(model: nn.Module, kinds: type | tuple[type, ...]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kinds)]  # modules() yields a shared module once


def _results(model: nn.Module) -> dict[str, PatchPassResult]:
    return {r.name: r for r in combine(model.__dict__[RECORD_ATTR].passes)}


def test_each_pass_result_matches_an_independent_count():
    model = Hand()
    n_act_modules = len(_unique(model, ACTIVATION_MODULES))
    n_dropout_modules = len(_unique(model, nn.Dropout))
    n_activation_calls = _calls_in_forward(Hand, {"relu", "tanh"})
    n_dropout_calls = _calls_in_forward(Hand, {"dropout"})
    assert (n_act_modules, n_dropout_modules, n_activation_calls, n_dropout_calls) == (2, 1, 4, 1)

    gaaf_patch.patch(model, strip_dropout=True)
    res = _results(model)
    assert list(res) == ORDER
    assert res["dropout"].counts == {"modules": n_dropout_modules, "attributes": 0}
    assert res["functional"].counts == {
        "activations": n_activation_calls,
        "dropout": n_dropout_calls,
        "methods": 1,
        "runtime_scopes": 0,
    }
    assert res["functional"].changed == n_activation_calls + n_dropout_calls
    assert res["modules"].counts == {"modules": n_act_modules, "attributes": 0}

    # ... and with what the patched model holds, walked without the passes.
    gaafs = _unique(model, GAAF)
    assert sum(g.site.form == "module" for g in gaafs) == res["modules"].changed
    assert sum(g.site.form == "function" for g in gaafs) == res["functional"].counts["activations"]
    assert len(_unique(model, StrippedDropout)) == res["dropout"].counts["modules"]
    fused = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d) and type(m) is not nn.BatchNorm1d]
    assert len(fused) == res["fuse"].changed == 1
    n_calls = 7  # 4 functional sites + the GELU called twice (self.act, then inside self.block) + the tanh module
    assert {g.delta for g in gaafs} == {gain.delta_for(n_calls)} and res["budget"].changed == len(gaafs)
    assert all(r.modified for r in res.values())


def test_the_report_lists_each_pass_and_round_trips():
    model = gaaf_patch.patch(Hand(), strip_dropout=True)
    rep = gaaf_patch.report(model)
    assert [p["name"] for p in rep.passes] == ORDER
    assert rep.passes[1] == {
        "name": "functional",
        "modified": True,
        "changed": 5,
        "counts": {"activations": 4, "dropout": 1, "methods": 1, "runtime_scopes": 0},
    }
    doc = rep.to_dict()
    assert doc["passes"] == rep.passes and pickle.loads(pickle.dumps(doc)) == doc
    assert '"passes": [{"name": "dropout"' in rep.to_json()
    # functional dropout is listed from the record, next to the module one
    assert {s["name"] for s in rep.stripped} == {"drop", "dropout"}


def test_the_pass_manager_returns_pytorch_pass_results_and_records_them_detached():
    model = Hand()
    ctx = Context(model, PatchConfig(strip_dropout=True))
    results = run(ctx)
    assert [r.name for r in results] == ORDER == [p(Context(Hand(), PatchConfig())).name for p in PASSES]
    for r in results:
        pr = r.pass_result()
        assert isinstance(pr, PassResult) and pr.graph_module is model and pr.modified == r.modified
    record = PatchRecord.for_config(ctx.config)
    record.absorb(ctx, results)
    assert [r.graph_module for r in record.passes] == [None] * 5  # no reference back to the model
    assert record.passes == results  # equal but for the module


def test_patching_twice_adds_runs_that_change_nothing():
    model = gaaf_patch.patch(Hand(), strip_dropout=True)
    first = gaaf_patch.report(model).passes
    gaaf_patch.patch(model, strip_dropout=True)
    second_run = model.__dict__[RECORD_ATTR].passes[5:]
    assert [r.name for r in second_run] == ORDER and not any(r.modified for r in second_run)
    assert gaaf_patch.report(model).passes == first


def test_attribute_forms_are_counted():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1)  # activation=F.relu, self_attn.dropout=0.1
    n_dropout = len(_unique(layer, nn.Dropout))
    gaaf_patch.patch(layer, strip_dropout=True)
    res = _results(layer)
    assert res["dropout"].counts == {"modules": n_dropout, "attributes": 1}
    assert res["modules"].counts == {"modules": 0, "attributes": 1}
    assert not res["functional"].modified  # torch's own layers are not traced


def test_a_filter_that_takes_nothing_modifies_nothing():
    model = gaaf_patch.patch(Hand(), strip_dropout=True, filter_fn=lambda m, name: False)
    res = _results(model)
    assert list(res) == ORDER and not any(r.modified for r in res.values())
    assert _unique(model, GAAF) == []


def test_the_backend_records_its_steps_like_patch():
    gm = fx.symbolic_trace(Hand())  # module calls stay modules: the backend rewrites the 4 function calls
    n_sites = sum(n.op == "call_function" and n.target in (F.relu, torch.tanh) for n in gm.graph.nodes)
    graph_pass = GAAFPass(PatchConfig(strip_dropout=True))
    result = graph_pass(gm)
    assert isinstance(result, PassResult) and result.modified
    res = {r.name: r for r in graph_pass.last_passes}
    assert list(res) == ["functional", "budget"]
    assert res["functional"].counts == {"activations": n_sites, "dropout": 1}
    assert res["budget"].changed == n_sites == len(graph_pass.last_sites)
    assert res["functional"].graph_module is gm
    assert graph_pass.last_record is not None and graph_pass.last_record.passes == graph_pass.last_passes
    assert not GAAFPass()(gm).modified


# ---------------------------------------------------------------------------------------------------------------------
# The gate rule


def _graph(*users: tuple[str, object]) -> tuple[fx.Graph, fx.Node]:
    """x -> sigmoid -> users[0] -> users[1] -> ...; each user is ("method", name) or ("function", target)."""
    g = fx.Graph()
    x = g.placeholder("x")
    sig = g.call_function(torch.sigmoid, (x,))
    node = sig
    for kind, target in users:
        node = g.call_method(target, (node,)) if kind == "method" else g.call_function(target, (node, x))
    g.output(node)
    return g, sig


def test_reaches_mul_through_views_only():
    assert reaches_mul(_graph(("function", operator.mul))[1])
    assert reaches_mul(_graph(("method", "view"), ("method", "float"), ("function", torch.mul))[1])
    assert not reaches_mul(_graph(("function", operator.add), ("function", operator.mul))[1])
    assert not reaches_mul(_graph(("method", "sum"))[1])


def test_reaches_mul_depth():
    views = [("method", "contiguous")] * MAX_DEPTH
    assert reaches_mul(_graph(*views, ("function", operator.mul))[1])
    assert not reaches_mul(_graph(*views, ("method", "contiguous"), ("function", operator.mul))[1])


def test_gates_found_in_code_are_left_alone():
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.gate = nn.Linear(4, 4), nn.Sigmoid()

        def forward(self, x):
            return x * self.gate(self.fc(x.mean(0))).view(1, 4) + torch.sigmoid(x).transpose(0, 1).transpose(0, 1) * x

    model = gaaf_patch.patch(SE())
    assert sorted(s["name"] for s in gaaf_patch.report(model).skipped) == ["gate", "sigmoid"]
    assert not any(r.modified for r in _results(model).values())


# ---------------------------------------------------------------------------------------------------------------------
# Pickling


def test_a_patched_model_pickles_and_old_names_still_load():
    from gaaf_patch.passes import functional

    assert functional.PatchedForward is PatchedForward  # the name pickles made before the split refer to
    model = gaaf_patch.patch(Hand(), strip_dropout=True)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.__dict__["forward"], PatchedForward)
    assert gaaf_patch.report(loaded).to_dict() == gaaf_patch.report(model).to_dict()
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_a_record_from_before_the_pass_results_loads_with_empty_fields():
    record = PatchRecord(config={})
    del record.__dict__["passes"], record.__dict__["stripped"]  # as an older version pickled it
    loaded = pickle.loads(pickle.dumps(record))
    assert loaded.passes == [] and loaded.stripped == [] and loaded.config == {}


def test_the_report_reads_no_pass_internals():
    import gaaf_patch.report as report_module

    tree = ast.parse(inspect.getsource(report_module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m and m.startswith("passes")} <= {"passes.context", "passes.result"}
