"""Hugging Face transformers: ``gaaf-patch hf:MODEL``, ``hf:DIR``, keyword inputs in the check, and a CI-sized
``coverage --hf`` over representative architectures (the full sweep of every model type is
``gaaf-patch coverage --hf``, docs/coverage.md). Models are built from shrunk default configs: nothing is
downloaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from gaaf_patch import coverage as cov  # noqa: E402
from gaaf_patch import hf  # noqa: E402
from gaaf_patch.cli import main  # noqa: E402
from gaaf_patch.cli.render import PARAMETERS_ONLY  # noqa: E402
from gaaf_patch.coverage import zoo  # noqa: E402
from gaaf_patch.verify import (  # noqa: E402
    NOT_DIFFERENTIABLE,
    WRT_EMBEDDINGS,
    Example,
    forward_and_input_grad,
    verify,
)

# One per family of architectures, each exercising another path: an encoder (bert), a decoder with Conv1D and
# gelu_new (gpt2), RoPE + SwiGLU (llama), an encoder-decoder with decoder inputs (t5), a ViT on pixel values, a
# text-and-image model fed both (clip), audio features into a conv front end and an encoder-decoder (whisper), a
# mixture of experts (mixtral), and an LSTM in a codec fed waveforms (encodec).
REPRESENTATIVE = ["bert", "gpt2", "llama", "t5", "vit", "clip", "whisper", "mixtral", "encodec"]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    rc = main([*argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------ the CI coverage


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_representative_model_type_passes_every_check(model_type: str) -> None:
    r = cov.check(zoo.entry_for(f"hf:{model_type}"))
    assert r.status == cov.PASS, r.reason
    assert r.checks == dict.fromkeys(cov.HF_CHECKS, True)
    assert r.replaced > 0  # something was patched: a pass on an untouched model would prove nothing


def test_encodec_holds_an_lstm_reported_unreached_and_the_audit_accounts_for_it() -> None:
    """An RNN is no GAAF site (its gates run inside the fused kernel): reported unreached with the reason, and the
    audit's findings in it are explained by that entry, not silent."""
    r = cov.check(zoo.entry_for("hf:encodec"))
    lstm = [u for u in r.unreached if "LSTM" in u.get("target", "")]
    assert lstm and all(u.get("reason") for u in lstm)
    assert all(f["explained"] for f in r.leftover_runtime)


def test_a_model_type_that_does_not_build_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(spec: str, overrides=None) -> nn.Module:
        raise hf.HFError(f"hf:{spec}: cannot build the model (ValueError: no)")

    monkeypatch.setattr(hf, "build", broken)
    r = cov.check(zoo.entry_for("hf:bert"))
    assert (
        r.status == cov.SKIP and r.reason == "does not build: HFError: hf:bert: cannot build the model (ValueError: no)"
    )
    assert cov.summarize([r], cov.HF_TARGET).checked == 0  # not counted


def test_a_silent_miss_fails_the_audit_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A patch that leaves an activation running (here: every site filtered out, so nothing is reported either)
    must fail check (b), with the op and the module named."""
    from gaaf_patch.coverage import hf as cov_hf

    real = cov_hf.patch
    monkeypatch.setattr(cov_hf, "patch", lambda m, **kw: real(m, filter_fn=lambda mod, name: False, **kw))
    r = cov.check(zoo.entry_for("hf:bert"))
    assert r.status == cov.FAIL and r.checks["b_audit"] is False and r.checks["a_exact"]
    assert "aten.gelu" in r.reason and "silent" in r.reason


# -------------------------------------------------------------------------------------------- building and inputs


def test_shrunk_config_keeps_one_layer_of_each_kind_and_token_ids_in_the_vocabulary() -> None:
    full = transformers.AutoConfig.for_model("qwen3_next")
    config = hf.shrunk_config("qwen3_next")
    assert set(config.layer_types) == set(full.layer_types) == {"linear_attention", "full_attention"}
    assert config.num_hidden_layers == len(config.layer_types) <= 3
    whisper = hf.shrunk_config("whisper")
    ids = [v for k, v in vars(whisper).items() if k.endswith("token_id") and isinstance(v, int)]
    assert ids and max(ids) < whisper.vocab_size <= transformers.AutoConfig.for_model("whisper").vocab_size
    assert hf.shrunk_config("bert", {"num_hidden_layers": 1}).num_hidden_layers == 1
    with pytest.raises(hf.HFError, match="no field 'no_such_field'"):
        hf.shrunk_config("bert", {"no_such_field": 1})
    with pytest.raises(hf.HFError, match="not a transformers model type; did you mean bert"):
        hf.shrunk_config("bertt")


def test_text_and_image_models_get_both_inputs() -> None:
    model = hf.build("clip")
    inputs = hf.runnable_inputs(model)
    assert set(inputs) == {"input_ids", "pixel_values"}
    assert (
        inputs["input_ids"].dtype == torch.int64
        and inputs["pixel_values"].shape[-1] == model.config.vision_config.image_size
    )


# ------------------------------------------------------------------------------------- the check on token inputs


class _TokenTanh(nn.Module):
    """Token ids -> embedding -> tanh: the gradient w.r.t. the embedding output is 1 - tanh(e)^2, known in closed
    form."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids):
        return torch.tanh(self.embed(input_ids))


class _NoEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 3))

    def forward(self, input_ids):
        return torch.tanh(self.w[input_ids])


def test_token_inputs_are_differentiated_at_the_embedding_output() -> None:
    torch.manual_seed(0)
    model, ids = _TokenTanh(), torch.tensor([[1, 2, 3], [4, 5, 9]])
    outs, grad, wrt = forward_and_input_grad(model, Example(kwargs={"input_ids": ids}))
    assert wrt == WRT_EMBEDDINGS
    e = model.embed.weight.detach()[ids]
    torch.testing.assert_close(grad, 1 - torch.tanh(e) ** 2, rtol=0, atol=1e-7)


def test_integer_inputs_without_embeddings_say_the_gradient_was_not_checked() -> None:
    import copy

    import gaaf_patch as gaaf

    model = _NoEmbeddings()
    patched = gaaf.patch(copy.deepcopy(model))
    v = verify(model, patched, Example((torch.tensor([[1, 2]]),)))
    assert v.ok and v.gradient_expect == NOT_DIFFERENTIABLE and v.gradient_wrt == NOT_DIFFERENTIABLE
    assert v.inputs == "0 [1, 2] int64" and v.audit.ok


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_patches_an_hf_model_type_and_checks_it_on_token_ids(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run_json(capsys, ["hf:bert", "--strip-dropout"])
    assert rc == 0, doc
    v = doc["verification"]
    assert v["ok"] and v["output"]["check"] == "bit-identical" and v["audit"]["ok"]
    assert v["inputs"] == "input_ids [2, 8] int64" and v["gradient_wrt"] == WRT_EMBEDDINGS
    assert v["gradient"]["expect"] == "differ" and v["gradient"]["ok"]
    layers = sum(type(m).__name__ == "BertIntermediate" for m in hf.build("bert").modules())
    assert len(doc["report"]["replaced"]) == layers + 1  # a GELU per layer, the pooler's tanh
    # the gradient scale is measured with the keyword inputs passed positionally; token ids have no gradient
    assert doc["report"]["gradient_scale"]["params"] > 0 and doc["gradient_scale_note"] == PARAMETERS_ONLY


def test_cli_encoder_decoder_is_differentiated_at_both_tied_embeddings(capsys: pytest.CaptureFixture[str]) -> None:
    """T5's encoder and decoder each hold an Embedding tied to ``get_input_embeddings()``: both are hooked."""
    rc, doc = run_json(capsys, ["hf:t5"])
    v = doc["verification"]
    assert rc == 0 and v["gradient_wrt"] == WRT_EMBEDDINGS and v["gradient"]["expect"] == "differ"
    assert v["inputs"] == "input_ids [2, 8] int64, decoder_input_ids [2, 8] int64"


def test_cli_config_overrides_and_their_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = run_json(capsys, ["hf:bert", "--config", "num_hidden_layers=1", "--config", "hidden_act=gelu_new"])
    assert rc == 0 and len(doc["report"]["replaced"]) == 2
    assert {r["activation"] for r in doc["report"]["replaced"]} == {"gelu", "tanh"}
    assert main(["resnet18", "--config", "num_hidden_layers=1"]) == 2
    assert "--config sets fields of a Hugging Face config: only for hf:MODEL" in capsys.readouterr().err
    assert main(["hf:bert", "--config", "nonsense"]) == 2
    assert "--config takes KEY=VALUE, not 'nonsense'" in capsys.readouterr().err
    assert main(["hf:bert", "--input-size", "3,32,32"]) == 2
    assert "--input-size: hf: models are checked on inputs sized from their config" in capsys.readouterr().err
    assert main(["hf:bert", "--num-classes", "3"]) == 2
    assert "hf: builds a base model (no classifier head)" in capsys.readouterr().err


def test_cli_rich_output_says_what_the_gradient_is_taken_against(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hf:gpt2"]) == 0
    out = capsys.readouterr().out
    assert "forward bit-identical on input_ids [2, 8] int64: ok" in out
    assert f"gradient w.r.t. the {WRT_EMBEDDINGS} should differ: ok" in out


def test_cli_patches_a_save_pretrained_directory_with_its_head(tmp_path: Path, capsys) -> None:
    config = hf.shrunk_config("bert", {"num_labels": 3})
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    rc, doc = run_json(capsys, [f"hf:{tmp_path}", "--strip-dropout"])
    assert rc == 0 and doc["verification"]["ok"]
    assert type(hf.build(str(tmp_path))).__name__ == "BertForSequenceClassification"
    assert main([f"hf:{tmp_path / 'missing'}"]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([f"hf:{tmp_path / 'empty'}"]) == 2
    assert "no config.json in that directory" in capsys.readouterr().err


def test_cli_without_transformers_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["hf:bert"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gaaf-patch: error: hf: models need transformers: pip install 'gaaf-patch[hf]'"]
    assert main(["coverage", "--hf"]) == 2
    assert "pip install 'gaaf-patch[hf]'" in capsys.readouterr().err


def test_cli_coverage_hf_writes_its_section_and_keeps_the_rest(tmp_path: Path, capsys) -> None:
    js, md = tmp_path / "c.json", tmp_path / "coverage.md"
    md.write_text("# Coverage of the timm and torchvision zoos\n\nthe timm part\n")
    argv = ["coverage", "--hf", "--models", "bert,gpt2", "--timeout", "0", "--json", str(js), "--markdown", str(md)]
    assert main(argv) == 0
    doc = json.loads(js.read_text())
    assert [r["family"] for r in doc["results"]] == ["bert", "gpt2"] and doc["summary"]["met"]
    assert doc["versions"]["transformers"] == transformers.__version__
    text = md.read_text()
    assert text.startswith("# Coverage of the timm and torchvision zoos\n\nthe timm part\n")
    assert "## Hugging Face transformers" in text and "| bert | BertModel |" in text
    assert main(argv) == 0  # rerun: the section is replaced, not appended twice
    assert md.read_text().count("## Hugging Face transformers") == 1
    assert "model types: 2/2 of those that build pass" in capsys.readouterr().out
    assert main(["coverage", "--hf", "--models", "no_such_type"]) == 2
    assert "no transformers model type 'no_such_type'" in capsys.readouterr().err
    assert main(["coverage", "--hf", "--all", "--no-timm"]) == 2
    assert "--all, --no-timm: the timm/torchvision sweep's options" in capsys.readouterr().err


def test_the_cli_prints_the_noise_it_kept_once_per_site(capsys: pytest.CaptureFixture[str]) -> None:
    """wav2vec2 keeps SpecAugment (input augmentation): one line saying so, its knob and value, said once."""
    assert main(["hf:wav2vec2", "--strip-dropout", "--config", "num_hidden_layers=1"]) == 0
    out = capsys.readouterr().out
    kept = [line for line in out.splitlines() if "kept" in line]
    assert kept == [
        "SpecAugment kept: input augmentation, not dropout (config.mask_time_prob=0.05; set it to 0 to turn it off)"
    ], out
