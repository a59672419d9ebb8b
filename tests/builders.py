"""Tiny models, tokenizers and corpora built in code (no hub access), and the committed GLUE fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GLUE_DIR = Path(__file__).resolve().parent / "fixtures" / "glue"
MNLI_DIR = Path(__file__).resolve().parent / "fixtures" / "mnli"  # synthetic: the MNLI layout, made-up rows

_WORDS = (
    "the of and to a in is was for on as with by he she it that at from his her an were are which this "
    "be or has had not first one their its new after but who they have also two been other people "
    "time year years city world state school war film music team game book river language between "
    "during under most would made where there can all into only more some over such when about than "
    "then through any these many used while because well known part called named born died became "
    "history science computer student teacher model small large good bad movie great story "
    "# . , ; : ! ? ' ( ) - / & %"
).split()


def tiny_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = [f"##{c}" for c in chars]
    seen, vocab = set(), []
    for token in specials + chars + pieces + _WORDS:
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return vocab


def build_tiny_bert(directory: Path, num_layers: int = 12, hidden_size: int = 32, num_heads: int = 2,
                    with_mlm_head: bool = True, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Save a random tiny BERT (MLM head or plain encoder) and a WordPiece tokenizer to `directory`."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tiny_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)
    config = BertConfig(vocab_size=len(tiny_vocab()), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
                        max_position_embeddings=128, type_vocab_size=2, initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = (BertForMaskedLM if with_mlm_head else BertModel)(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_distilbert(directory: Path, tokenizer_dir: Path, num_layers: int, initializer_range: float = 0.02
                          ) -> Path:
    """A random 32-wide DistilBertForMaskedLM (the init-student output class) with the teacher's tokenizer."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, hidden_dim=64, n_layers=num_layers, n_heads=2,
                              max_position_embeddings=128, initializer_range=initializer_range)
    torch.manual_seed(0)
    DistilBertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_roberta(directory: Path, num_layers: int = 4, hidden_size: int = 32) -> Path:
    """A random tiny RobertaForMaskedLM with a byte-level BPE tokenizer (one token per byte, no merges)."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    vocab = {token: index for index, token in
             enumerate(["<s>", "<pad>", "</s>", "<unk>", *sorted(ByteLevel.alphabet()), "<mask>"])}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=96)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=98,
                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    torch.manual_seed(1)
    RobertaForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_corpus(path: Path, n_lines: int = 60) -> Path:
    """A small random corpus (one document per line) of the tiny vocabulary's whole words."""
    words = [w for w in tiny_vocab()[5:] if w.isalpha() and len(w) > 1]
    rng = np.random.default_rng(0)
    path.write_text("".join(" ".join(rng.choice(words, size=rng.integers(12, 40))) + "\n" for _ in range(n_lines)))
    return path
