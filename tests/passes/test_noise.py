"""Training-time noise that is not a dropout module (gaaf_patch/passes/noise.py), and dropout found by a rule rather
than a type: LayerDrop read from a shared config, router jitter, quantizer dropout, RoPE augmentation (stripped, the
knob restored bit-exactly by unpatch), SpecAugment and sampling by design (kept, with the reason), a dropout module
of another library (SEW-D's StableDropout), the dropout of ``nn.MultiheadAttention`` and of code that calls
``F.multi_head_attention_forward`` itself (WavLM). Each test runs the model: two train-mode forwards under different
seeds agree after the strip, and the audit has nothing silent."""

from __future__ import annotations

import copy
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaaf_patch as gaaf
from gaaf_patch.audit import audit
from gaaf_patch.modules import StrippedDropout
from gaaf_patch.passes.noise import ConfigView


def _twice(model: nn.Module, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    torch.manual_seed(1)
    a = model(*x)
    torch.manual_seed(2)
    return a, model(*x)


class Cfg:
    """A stand-in for a Hugging Face config: a plain object the model and its submodules share."""

    def __init__(self, **kw) -> None:
        self.layerdrop = 0.5
        self.mask_time_prob = 0.0
        self.pos_embed_shift = None
        self.hidden = 8
        self.__dict__.update(kw)


class Encoder(nn.Module):
    """wav2vec2's encoder: LayerDrop read from the shared config, a ``torch.rand([])`` per layer."""

    def __init__(self, config: Cfg) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(config.hidden, config.hidden) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            if self.training and self.config.layerdrop > 0.0:
                if torch.rand([]) < self.config.layerdrop:
                    continue
            x = torch.tanh(layer(x))
        return x


class Model(nn.Module):
    def __init__(self, config: Cfg | None = None, encoders: int = 1) -> None:
        super().__init__()
        self.config = config or Cfg()
        self.encoders = nn.ModuleList(Encoder(self.config) for _ in range(encoders))

    def forward(self, x):
        for enc in self.encoders:
            x = enc(x)
        return x


def test_layerdrop_read_from_a_shared_config_is_stripped_once_and_the_config_is_left_alone():
    model, x = Model(encoders=2), torch.randn(2, 8)
    a, b = _twice(model, x)
    assert not torch.equal(a, b)
    cfg = model.config
    gaaf.patch(model, strip_dropout=True)
    a, b = _twice(model, x)
    assert torch.equal(a, b)
    # the shared config is never written (save_pretrained saves it); each reader sees the knob off
    assert cfg.layerdrop == 0.5 and model.config is cfg
    views = [enc.config for enc in model.encoders]
    assert type(views[0]) is ConfigView and views[0] is views[1]  # zeroed once
    assert views[0].layerdrop == 0.0 and views[0].hidden == 8 and isinstance(views[0], Cfg)
    views[0].hidden = 9  # a write through the view reaches the shared config
    assert cfg.hidden == 9
    cfg.hidden = 8
    stripped = [s for s in gaaf.report(model).stripped if s.get("kind") == "LayerDrop"]
    assert [(s["name"], s["knob"], s["p"], s["off"]) for s in stripped] == [
        ("encoders.0.config.layerdrop", "config.layerdrop", 0.5, 0.0)
    ]
    assert gaaf.report(model).passes[0]["counts"]["attributes"] == 1
    assert gaaf.report(model).summary()["noise"] == {"LayerDrop": 1}
    gaaf.patch(model, strip_dropout=True)  # the same options again: nothing new
    assert model.encoders[0].config is views[0] and gaaf.report(model).summary()["noise"] == {"LayerDrop": 1}
    found = audit(model, x)
    assert found.ok and not found.randoms()  # LayerDrop off: nothing drawn any more
    gaaf.unpatch(model)
    assert all(enc.config is cfg for enc in model.encoders) and cfg.layerdrop == 0.5


def test_a_patched_model_with_a_config_view_copies_and_pickles_sharing_its_config():
    model = gaaf.patch(Model(), strip_dropout=True)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        view = twin.encoders[0].config
        assert type(view) is ConfigView and view.layerdrop == 0.0
        assert view.__dict__["_gaaf_target"] is twin.config and twin.config.layerdrop == 0.5
        gaaf.unpatch(twin)
        assert twin.encoders[0].config is twin.config


def test_a_failed_patch_gives_the_config_back():
    model = Model()

    def boom(module, name):
        if name == "encoders.0.layers.3":
            raise RuntimeError("boom")
        return True

    with pytest.raises(RuntimeError):
        gaaf.patch(model, strip_dropout=True, filter_fn=boom)
    assert model.encoders[0].config is model.config and model.config.layerdrop == 0.5


def test_without_strip_dropout_layerdrop_stays():
    model = gaaf.patch(Model())
    assert model.encoders[0].config is model.config
    assert not [s for s in gaaf.report(model).stripped if s.get("kind")]


def test_hf_layerdrop_is_off_in_training_and_save_pretrained_keeps_the_config(tmp_path):
    pytest.importorskip("transformers")
    from gaaf_patch.hf import build

    model = build("wav2vec2", {"mask_time_prob": 0.0})
    assert model.config.layerdrop > 0
    gaaf.patch(model, strip_dropout=True)
    assert model.encoder.config.layerdrop == 0.0 and model.config.layerdrop > 0
    model.save_pretrained(tmp_path)
    saved = type(model.config).from_pretrained(tmp_path)
    assert saved.layerdrop == model.config.layerdrop
    x = torch.randn(2, 400)
    a, b = _twice(model, x)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert audit(model, input_values=x).ok


class SpecAugment(nn.Module):
    """wav2vec2's ``_mask_hidden_states``: numpy-random time masks, probability from the config."""

    def __init__(self, config: Cfg) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if self.training and self.config.mask_time_prob > 0:
            keep = torch.from_numpy(np.random.rand(x.shape[0]) >= self.config.mask_time_prob)
            x = x * keep[:, None]
        return self.fc(x)


def test_specaugment_is_kept_and_reported_with_its_knob():
    model = gaaf.patch(SpecAugment(Cfg(mask_time_prob=0.5)), strip_dropout=True)
    assert model.config.mask_time_prob == 0.5 and type(model.config) is Cfg  # left as it is
    (kept,) = gaaf.report(model).kept
    assert kept["name"] == "config.mask_time_prob" and kept["kind"] == "SpecAugment" and kept["p"] == 0.5
    assert "config.mask_time_prob=0.5" in kept["reason"] and "not dropout" in kept["reason"]


class Router(nn.Module):
    """Switch Transformers' router: jitter noise on its input in training (``uniform_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.jitter_noise = 0.01
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return self.fc(x)


def test_router_jitter_is_stripped_reported_and_restored_bit_exactly():
    model, x = nn.Sequential(nn.Linear(8, 8), Router()), torch.randn(3, 8)
    old = model[1].jitter_noise
    gaaf.patch(model, strip_dropout=True)
    assert model[1].jitter_noise == 0.0
    a, b = _twice(model, x)
    assert torch.equal(a, b) and audit(model, x).ok and not audit(model, x).findings
    (entry,) = [s for s in gaaf.report(model).stripped if s.get("kind")]
    assert (entry["name"], entry["kind"], entry["knob"], entry["p"]) == (
        "1.jitter_noise",
        "router jitter",
        "jitter_noise",
        old,
    )
    gaaf.unpatch(model)
    assert model[1].jitter_noise is old


class Quantizer(nn.Module):
    """DAC's quantizer dropout: a random number of codebooks for a fraction of the batch (``randint``, drawn in
    training whatever the fraction)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.quantizer_dropout = p
        self.books = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        n = torch.full((x.shape[0],), 4.0)
        if self.training:
            draw = torch.randint(1, 4, (x.shape[0],))
            k = int(x.shape[0] * self.quantizer_dropout)
            n[:k] = draw[:k].float()
        out = 0
        for i, book in enumerate(self.books):
            out = out + book(x) * (i < n)[:, None]
        return out


def test_quantizer_dropout_is_stripped_and_its_draw_explained():
    model, x = Quantizer(), torch.randn(4, 8)
    gaaf.patch(model, strip_dropout=True)
    assert model.quantizer_dropout == 0.0
    a, b = _twice(model, x)
    assert torch.equal(a, b)
    found = audit(model, x)
    (draw,) = found.findings
    assert found.ok and draw.op == "aten.randint" and draw.kind == "draw"
    assert draw.explained == "quantizer dropout off (quantizer_dropout 0.5 -> 0.0): the draw decides nothing"
    gaaf.unpatch(model)
    assert model.quantizer_dropout == 0.5


class Rope(nn.Module):
    """DINOv3's RoPE augmentation: patch coordinates shifted by a random amount, from the config, in training."""

    def __init__(self, config: Cfg) -> None:
        super().__init__()
        self.config = config

    def forward(self, x):
        if self.training and self.config.pos_embed_shift is not None:
            x = x + torch.empty(1, x.shape[-1]).uniform_(-self.config.pos_embed_shift, self.config.pos_embed_shift)
        return torch.cos(x)


def test_rope_augmentation_is_turned_off_through_its_config_knob():
    cfg = Cfg(pos_embed_shift=0.2, layerdrop=0.0)
    model, x = Rope(cfg), torch.randn(2, 8)
    gaaf.patch(model, strip_dropout=True)
    assert model.config.pos_embed_shift is None and cfg.pos_embed_shift == 0.2
    a, b = _twice(model, x)
    assert torch.equal(a, b) and not audit(model, x).findings
    (entry,) = [s for s in gaaf.report(model).stripped if s.get("kind")]
    assert (entry["name"], entry["kind"], entry["off"]) == ("config.pos_embed_shift", "RoPE augmentation", None)
    gaaf.unpatch(model)
    assert model.config is cfg


def sparsemixer(scores, training):
    """PhiMoE's routing: experts sampled in training (Gumbel-max), a midpoint mask drawn against 0.75."""
    if training:
        pick = (scores - torch.empty_like(scores).exponential_().log()).argmax(-1, keepdim=True)
        mask = torch.rand_like(pick, dtype=scores.dtype) > 0.75
        return scores.gather(-1, pick) * (mask + 1)
    return scores.max(-1, keepdim=True)[0]


class MoeRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return sparsemixer(self.fc(x), training=self.training)


def test_sampling_by_design_is_kept_and_explains_its_mask():
    model = gaaf.patch(nn.Sequential(nn.Linear(8, 8), MoeRouter()), strip_dropout=True)
    (kept,) = gaaf.report(model).kept
    assert kept["name"] == "1" and kept["kind"] == "sparsemixer sampling" and "by design" in kept["reason"]
    found = audit(model, torch.randn(2, 8))
    assert found.ok
    assert sorted((f.module, f.kind, f.op) for f in found.findings) == [
        ("1", "draw", "aten.exponential_"),
        ("1", "random", "aten.rand_like"),  # compared with 0.75: a mask, explained by the kept entry
    ]
    assert {f.explained for f in found.findings} == {kept["reason"]}


class StableDropout(nn.Module):
    """SEW-D's dropout: not a subclass of nn.Dropout, its rate in ``drop_prob``."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.training and self.drop_prob > 0:
            return x * torch.empty_like(x).bernoulli_(1 - self.drop_prob) / (1 - self.drop_prob)
        return x


class PatchDropout(nn.Module):
    """timm's token dropping: named like a dropout, its rate in ``prob``, changes the shape: not matched."""

    def __init__(self) -> None:
        super().__init__()
        self.prob = 0.5

    def forward(self, x):
        return x


def test_a_dropout_module_of_another_library_is_stripped_by_its_class_name():
    drop = StableDropout(0.1)
    model, x = nn.Sequential(nn.Linear(8, 8), drop, PatchDropout()), torch.randn(2, 8)
    assert [f.op for f in audit(model, x).randoms()] == ["aten.bernoulli_"]
    gaaf.patch(model, strip_dropout=True)
    assert isinstance(model[1], StrippedDropout) and type(model[2]) is PatchDropout
    assert [(s["name"], s["target"], s["p"]) for s in gaaf.report(model).stripped] == [("1", "StableDropout", 0.1)]
    a, b = _twice(model, x)
    assert torch.equal(a, b) and not audit(model, x).findings
    gaaf.unpatch(model)
    assert model[1] is drop


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_dropout_is_zeroed_reported_and_restored():
    model, x = Mha(), torch.randn(5, 2, 8)
    a, b = _twice(model, x)
    assert not torch.equal(a, b)
    gaaf.patch(model, strip_dropout=True)
    assert model.attn.dropout == 0.0
    a, b = _twice(model, x)
    assert torch.equal(a, b) and not audit(model, x).findings
    entries = [s for s in gaaf.report(model).stripped if s["name"] == "attn.dropout"]
    assert [(s["target"], s["p"]) for s in entries] == [("MultiheadAttention.dropout", 0.3)]
    gaaf.unpatch(model)
    assert model.attn.dropout == 0.3


class WavLMAttention(nn.Module):
    """WavLM's attention: ``F.multi_head_attention_forward`` called with a float ``self.dropout`` as dropout_p."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = 0.3
        self.in_proj = nn.Linear(8, 24)
        self.out_proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.multi_head_attention_forward(
            x, x, x, 8, 2, self.in_proj.weight, self.in_proj.bias, None, None, False, self.dropout,
            self.out_proj.weight, self.out_proj.bias, self.training, need_weights=True,
        )[0]  # fmt: skip


def test_the_dropout_p_of_multi_head_attention_forward_is_zeroed_through_its_attribute():
    model, x = WavLMAttention(), torch.randn(5, 2, 8)
    assert [f.op for f in audit(model, x).randoms()] == ["aten.bernoulli_"]
    gaaf.patch(model, strip_dropout=True)
    assert model.dropout == 0.0
    a, b = _twice(model, x)
    assert torch.equal(a, b) and not audit(model, x).findings
    (entry,) = [s for s in gaaf.report(model).stripped if s["name"] == "dropout"]
    assert entry["target"] == "multi_head_attention_forward(dropout_p)" and entry["p"] == 0.3
    gaaf.unpatch(model)
    assert model.dropout == 0.3


class PyRandomLayerDrop(nn.Module):
    """FSMT's LayerDrop: Python's ``random.uniform``, invisible to the audit; the probability on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.layerdrop = 0.5
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            if self.training and random.uniform(0, 1) < self.layerdrop:
                continue
            x = layer(x)
        return x


def test_python_random_layerdrop_is_zeroed_by_its_knob():
    model, x = PyRandomLayerDrop(), torch.randn(2, 8)
    gaaf.patch(model, strip_dropout=True)
    random.seed(0)
    a = model.train()(x)
    random.seed(1)
    assert torch.equal(a, model(x))
    assert [(s["name"], s["kind"]) for s in gaaf.report(model).stripped] == [("layerdrop", "LayerDrop")]
