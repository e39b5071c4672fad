"""The cost of patching Hugging Face models, whose attention code fx cannot trace (run-time scopes, passes/scope.py).

``python -m benchmarks.hf_overhead [--repeats 15] [--threads 1] [--size tiny|base] [--json PATH]``: BERT, GPT-2 and
Llama from shrunk default configs (``gaaf_patch.hf``; every dropout probability 0.1), batch 8 x 32 tokens (``--size
base``: BERT-base's width, 768 wide with 12 heads and a 3072 MLP, 2 layers, batch 4 x 128 tokens: per-op Python
overhead weighs less there, as in real use; the per-layer ratio does not depend on the depth), one training step (forward,
mean-square loss on the last hidden state, backward, SGD) of the plain model and of ``gaaf.patch(model,
strip_dropout=True)``, interleaved (benchmarks/timing.py), median of the per-repeat ratios. Target: <= 1.10x.
The plain model keeps its dropout (what a user replaces); ``plain_nodrop`` (dropout probabilities 0) separates the
patch's own cost from the cost of the dropout it removes.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import git_commit, loadavg, worktree_changes
from benchmarks.timing import interleaved, summarize

MODELS = ("bert", "gpt2", "llama")
TARGET = 1.10
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "attention_dropout", "hidden_dropout", "dropout")  # fmt: skip


class _Step:
    def __init__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> None:
        self.model, self.inputs = model.train(), inputs
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.model(**self.inputs).last_hidden_state
        out.float().pow(2).mean().backward()
        self.opt.step()


def _dropouts(p: float) -> dict[str, float]:
    return dict.fromkeys(_DROPOUT_KEYS, p)


# Field names of the width, depth and heads in each model's config (``--size base``).
_BASE = {
    "bert": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "num_hidden_layers": 2},
    "gpt2": {"n_embd": 768, "n_head": 12, "n_inner": 3072, "n_layer": 2},
    "llama": {"hidden_size": 768, "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64,
              "intermediate_size": 3072, "num_hidden_layers": 2},
}  # fmt: skip
SIZES = {"tiny": (8, 32), "base": (4, 128)}  # batch, tokens


def measure(name: str, repeats: int, inner: int, size: str = "tiny") -> dict[str, Any]:
    import gaaf_patch as gaaf
    from gaaf_patch import hf

    def build(p: float) -> torch.nn.Module:
        config = hf.shrunk_config(name, _BASE[name] if size == "base" else None)
        for key, value in _dropouts(p).items():
            if hasattr(config, key):
                setattr(config, key, value)
        torch.manual_seed(0)
        import transformers

        return transformers.AutoModel.from_config(config)

    plain = build(0.1)
    batch, seq = SIZES[size]
    inputs = hf.example_inputs(plain, batch=batch, seq=seq)
    runners = {
        "base": _Step(plain, inputs),
        "plain_nodrop": _Step(build(0.0), inputs),
        "gaaf": _Step(gaaf.patch(build(0.1), strip_dropout=True), inputs),
    }
    for r in runners.values():  # warm up: run-time sites are created on the first call
        for _ in range(3):
            r.step()
    summary = summarize(interleaved(runners, "step", repeats, inner))
    report = gaaf.report(runners["gaaf"].model)
    return {
        **summary,
        "runtime_scopes": len(report.runtime),
        "replaced": len(report.replaced),
        "stripped": len(report.stripped),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {m: measure(m, args.repeats, args.inner, args.size) for m in args.models.split(",")}
    print(f"{'model':8} {'plain ms':>9} {'gaaf/plain':>11} {'[q1-q3]':>14} {'nodrop/plain':>13}  sites")
    for m, r in results.items():
        g, nd = r["gaaf"], r["plain_nodrop"]
        verdict = "ok" if g["ratio"] <= TARGET else "over target"
        print(
            f"{m:8} {r['base']['ms']:9.2f} {g['ratio']:10.3f}x [{g['ratio_q1']:.3f}-{g['ratio_q3']:.3f}] "
            f"{nd['ratio']:12.3f}x  {r['replaced']} replaced, {r['stripped']} stripped, "
            f"{r['runtime_scopes']} run-time scopes: {verdict}"
        )
    if args.json:
        import transformers

        doc = {
            "command": "python -m benchmarks.hf_overhead " + " ".join(argv or []),
            "commit": git_commit(),
            "dirty": worktree_changes(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "size": args.size,
            "loadavg": loadavg(),
            "target": TARGET,
            "results": results,
        }
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
