"""Tiny random-initialised models (llama, gpt2, gpt_neox, qwen2, gemma families) with a real tokenizer.

Tests and `experiments/tiny/` use these: no download, seconds to build. The tokenizer is a small
byte-level BPE trained on the built-in Python-docs text, so token ids are real and stable.

    python -m saecli.lm.tiny experiments/tiny/model --family llama
    python -m saecli.lm.tiny experiments/tiny/model_chat --variant-of experiments/tiny/model   # a "fine-tune"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

FAMILIES = ("llama", "gpt2", "gpt_neox", "qwen2", "gemma")


def _corpus(max_chars: int = 400_000) -> list[str]:
    import pydoc_data.topics as topics

    texts, total = [], 0
    for _, text in sorted(topics.topics.items()):
        texts.append(text)
        total += len(text)
        if total > max_chars:
            break
    return texts


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def make_config(family: str, vocab_size: int, *, d_model: int = 64, n_layers: int = 4, n_heads: int = 4):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size)
    if family in ("llama", "qwen2", "gemma"):
        extra = dict(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=0,
            pad_token_id=2,
            tie_word_embeddings=(family == "gemma"),
        )
        if family == "gemma":
            extra["head_dim"] = d_model // n_heads
        return AutoConfig.for_model(family, **common, **extra)
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            **common,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=1024,
            bos_token_id=1,
            eos_token_id=0,
        )
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox",
            **common,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def make_tiny_model(
    folder: str | Path,
    family: str = "llama",
    *,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Build, save (save_pretrained) and return the folder of a tiny random model + tokenizer."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tokenizer = make_tokenizer(vocab_size)
    config = make_config(family, len(tokenizer), d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_variant(
    source: str | Path, folder: str | Path, *, layers: tuple[int, ...] = (2, 3), scale: float = 2.0, seed: int = 1
) -> Path:
    """A copy of the tiny model at `source` whose MLP weights in `layers` get relative Gaussian noise of
    `scale` (same tokenizer, same earlier layers): a stand-in for a fine-tuned model in model-diffing
    examples, so that a crosscoder finds shared latents and latents of one model only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    model = AutoModelForCausalLM.from_pretrained(source)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if "mlp" in parts and any(f"layers.{i}." in name or f"h.{i}." in name for i in layers):
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument(
        "--variant-of",
        metavar="SOURCE",
        default=None,
        help="copy the tiny model at SOURCE with noise on its layer 2 and 3 MLPs (a 'fine-tune')",
    )
    args = parser.parse_args()
    if args.variant_of:
        print(make_tiny_variant(args.variant_of, args.folder))
        return
    print(make_tiny_model(args.folder, args.family, d_model=args.d_model, n_layers=args.n_layers))


if __name__ == "__main__":
    main()
