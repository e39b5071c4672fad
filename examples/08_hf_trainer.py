"""Patch a Hugging Face model, train it with ``transformers.Trainer``, deploy it with ``from_pretrained``.

A tiny BERT for sequence classification is built from a shrunk default config (``gaaf_patch.hf.shrunk_config``:
random weights, nothing downloaded), patched with ``gaaf.patch(model, strip_dropout=True)`` and trained for a few
steps by ``transformers.Trainer`` on a synthetic task (is token 7 in the sequence?). ``save_pretrained`` writes the
patched model as it is: GAAF adds no weights, so the plain class loads it strictly (no missing or unexpected keys)
and gives the same eval logits. The same check for every transformers model type is
``gaaf-patch coverage --hf``; ``gaaf-patch hf:DIR`` patches and checks a saved directory.

Run from the repository root (needs ``pip install 'gaaf-patch[hf]'``):

    python examples/08_hf_trainer.py
"""

import copy
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

import gaaf_patch as gaaf
from gaaf_patch.hf import shrunk_config

TOKEN = 7  # the label: whether this token occurs in the sequence


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 12, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.ids[: n // 2, 0] = TOKEN  # half the sequences carry the token at least once
        self.labels = (self.ids == TOKEN).any(1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = shrunk_config("bert", {"num_labels": 2, "vocab_size": 64})
    model = BertForSequenceClassification(config)
    gaaf.patch(model, strip_dropout=True)
    train, held_out = Synthetic(256), Synthetic(32, seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=str(Path(tmp) / "run"),
            per_device_train_batch_size=16,
            max_steps=20,
            learning_rate=3e-3,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,  # Trainer keeps the columns the forward names: the patched forward shows the original signature
        )
        before = _loss(model, held_out)
        Trainer(model=model, args=args, train_dataset=train).train()
        after = _loss(model, held_out)
        rep = gaaf.report(model)
        print(f"patched: {len(rep.replaced)} GAAF sites, {len(rep.stripped)} dropout sites stripped")
        print(f"held-out loss before training {before:.3f}, after {after:.3f}")
        assert after < before, "training did not lower the held-out loss"

        saved = Path(tmp) / "model"
        model.save_pretrained(saved)
        plain, info = BertForSequenceClassification.from_pretrained(saved, output_loading_info=True)
        missing, unexpected = info["missing_keys"], info["unexpected_keys"]
        assert not missing and not unexpected, info
        assert not any(isinstance(m, gaaf.GAAF) for m in plain.modules())  # the plain class, never patched
        # from_pretrained maps the file into memory at unaligned offsets, where the CPU kernels may round
        # differently; a copy holds the same weights in aligned memory
        plain = copy.deepcopy(plain).eval()
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(held_out.ids).logits, plain(held_out.ids).logits)
        print(f"reloaded into the plain {type(plain).__name__} (strict): eval logits bit-identical: {same}")
        assert same
    print("ok")


def _loss(model: torch.nn.Module, data: Synthetic) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=data.ids, labels=data.labels).loss.item()


if __name__ == "__main__":
    main()
