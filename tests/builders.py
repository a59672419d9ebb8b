"""Tiny models, tokenizers, corpora, loss configs and planted stages built in code (no hub access), and the
committed task fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GLUE_DIR = Path(__file__).resolve().parent / "fixtures" / "glue"
SQUAD_DIR = GLUE_DIR.parent / "squad"  # the official JSON layout: train-v1.1.json, dev-v1.1.json, v2.0
REVIEWS_DIR = GLUE_DIR.parent / "reviews"  # the IMDb layout: train.csv, test.csv (text, label)
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
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    vocab = _byte_vocab(["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"])
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=96)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=98,
                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    return _save(directory, RobertaForMaskedLM, config, tokenizer, seed=1)


def _byte_vocab(specials: list[str], last: list[str]) -> dict[str, int]:
    """Byte-level BPE tokens: one per byte (no merges) between special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    return {token: index for index, token in enumerate([*specials, *sorted(ByteLevel.alphabet()), *last])}


def unigram_vocab(specials: list[str]) -> list[tuple[str, float]]:
    """SentencePiece-style pieces after `specials`: each tiny-vocabulary word and character as a word start
    ("▁the") and each character inside a word, the shorter pieces less likely."""
    tokens = [token for token in tiny_vocab()[5:] if not token.startswith("##")]
    pieces = ["▁", *(f"▁{token}" for token in tokens), *(t for t in tokens if len(t) == 1)]
    return [(token, 0.0) for token in specials] + [(piece, -1.0 - 4.0 / len(piece)) for piece in pieces]


def _save(directory: Path, model_class, config, tokenizer, seed: int = 0) -> Path:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _small(hidden_size: int = 32) -> dict:
    return {"hidden_size": hidden_size, "num_attention_heads": 2, "intermediate_size": 2 * hidden_size}


def _wordpiece(tokenizer_class):
    return tokenizer_class(vocab={token: index for index, token in enumerate(tiny_vocab())}, do_lower_case=True,
                           model_max_length=128)


def build_tiny_xlm_roberta(directory: Path, num_layers: int = 4, camembert: bool = False) -> Path:
    """XLM-R (or CamemBERT): RoBERTa's layout with a SentencePiece-style Unigram tokenizer."""
    from transformers import (
        CamembertConfig,
        CamembertForMaskedLM,
        CamembertTokenizer,
        XLMRobertaConfig,
        XLMRobertaForMaskedLM,
        XLMRobertaTokenizer,
    )

    config_class, model_class, tokenizer_class = ((CamembertConfig, CamembertForMaskedLM, CamembertTokenizer)
                                                  if camembert else
                                                  (XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaTokenizer))
    vocab = unigram_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = tokenizer_class(vocab=vocab, model_max_length=128)
    config = config_class(vocab_size=len(vocab), num_hidden_layers=num_layers, max_position_embeddings=130,
                          type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **_small())
    return _save(directory, model_class, config, tokenizer)


def build_tiny_electra(directory: Path, num_layers: int = 4, discriminator: bool = False) -> Path:
    """An ELECTRA generator (ElectraForMaskedLM) or discriminator (ElectraForPreTraining, no MLM head), with
    16-wide embeddings projected to the 32-wide layers."""
    from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining, ElectraTokenizer

    config = ElectraConfig(vocab_size=len(tiny_vocab()), embedding_size=16, num_hidden_layers=num_layers,
                           max_position_embeddings=128, **_small())
    return _save(directory, ElectraForPreTraining if discriminator else ElectraForMaskedLM, config,
                 _wordpiece(ElectraTokenizer))


def build_tiny_deberta_v2(directory: Path, num_layers: int = 4, legacy: bool = False) -> Path:
    """DeBERTa-v3's layout: relative positions in buckets, no absolute positions, no token types, Unigram. Without
    `legacy`, as the released checkpoints: the original `lm_predictions` head, and no head layout named in
    config.json (which transformers reads as its other, `cls.predictions` layout)."""
    import json

    from transformers import DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2Tokenizer

    vocab = unigram_vocab(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"])
    tokenizer = DebertaV2Tokenizer(vocab=vocab, model_max_length=128)
    config = DebertaV2Config(vocab_size=len(vocab), num_hidden_layers=num_layers, max_position_embeddings=128,
                             relative_attention=True, position_buckets=16, max_relative_positions=-1,
                             pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm",
                             share_att_key=True, type_vocab_size=0, legacy=legacy, pad_token_id=0, **_small())
    _save(directory, DebertaV2ForMaskedLM, config, tokenizer)
    if not legacy:
        saved = json.loads((directory / "config.json").read_text())
        del saved["legacy"]
        (directory / "config.json").write_text(json.dumps(saved))
    return directory


def build_tiny_modernbert(directory: Path, num_layers: int = 4) -> Path:
    """ModernBERT: global attention in layers 0 and 3, an 8-token sliding window in layers 1 and 2, rotary
    positions; a byte-level BPE tokenizer with BERT's special tokens, as the released one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import ModernBertConfig, ModernBertForMaskedLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = _byte_vocab(specials, ["[MASK]"])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=128)
    config = ModernBertConfig(vocab_size=len(vocab), num_hidden_layers=num_layers, max_position_embeddings=128,
                              global_attn_every_n_layers=3, local_attention=8, pad_token_id=0, bos_token_id=2,
                              eos_token_id=3, cls_token_id=2, sep_token_id=3, **_small())
    return _save(directory, ModernBertForMaskedLM, config, tokenizer)


def build_tiny_distilbert_teacher(directory: Path, num_layers: int = 4) -> Path:
    """A DistilBertForMaskedLM as a teacher, with its own (token-type-free) tokenizer."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertTokenizer

    config = DistilBertConfig(vocab_size=len(tiny_vocab()), dim=32, hidden_dim=64, n_layers=num_layers, n_heads=2,
                              max_position_embeddings=128)
    return _save(directory, DistilBertForMaskedLM, config, _wordpiece(DistilBertTokenizer))


# One tiny teacher per family (and variant), built in code: name -> builder(directory, num_layers).
TINY_TEACHERS = {
    "bert": build_tiny_bert,
    "roberta": build_tiny_roberta,
    "xlm-roberta": build_tiny_xlm_roberta,
    "camembert": lambda directory, num_layers=4: build_tiny_xlm_roberta(directory, num_layers, camembert=True),
    "electra": build_tiny_electra,
    "electra-discriminator": lambda directory, num_layers=4: build_tiny_electra(directory, num_layers, True),
    "deberta-v2": build_tiny_deberta_v2,
    "deberta-v2-legacy-head": lambda directory, num_layers=4: build_tiny_deberta_v2(directory, num_layers, True),
    "modernbert": build_tiny_modernbert,
    "distilbert": build_tiny_distilbert_teacher,
}


def write_corpus(path: Path, n_lines: int = 60) -> Path:
    """A small random corpus (one document per line) of the tiny vocabulary's whole words."""
    words = [w for w in tiny_vocab()[5:] if w.isalpha() and len(w) > 1]
    rng = np.random.default_rng(0)
    path.write_text("".join(" ".join(rng.choice(words, size=rng.integers(12, 40))) + "\n" for _ in range(n_lines)))
    return path


def loss_config(**settings):
    """A `loss` config section with every weight 0 but those given (and the other keys at plain values)."""
    from omegaconf import OmegaConf

    from distilbert_cli.training.losses import LOSS_TERMS

    values = {**{f"alpha_{name}": 0.0 for name in LOSS_TERMS}, "temperature": 2.0, "restrict_ce_to_mask": False,
              "teacher_layer": None, "relation_heads": None}
    values.update(settings)
    return OmegaConf.create(values)


def open_stage(cfg, stage: str, overrides=(), **kwargs):
    """Open `stage` of the run directory of a validated config (for tests that write a stage by hand)."""
    from distilbert_cli.rundir import Run

    return Run.of(cfg).open_stage(stage, cfg, overrides, **kwargs)


def plant_trained_runs(run_dir: Path, stage: str, overrides: list[str], seeds: dict[int, dict], task: str = "rte"):
    """A complete finetune or task-distill stage whose student on `task` has one given metrics.json per seed (what
    the report reads of each arm's budget); returns the run."""
    import json

    from distilbert_cli import artifacts
    from distilbert_cli.config import compose_config
    from distilbert_cli.rundir import Run

    command = {artifacts.FINETUNE: "finetune", artifacts.TASK_DISTILL: "task_distill"}[stage]
    with open_stage(compose_config(command, [f"run_dir={run_dir}", *overrides]), stage) as opened:
        for seed, metrics in seeds.items():
            out = artifacts.FinetuneRun.of(opened.path, "student", task, seed)
            out.path.mkdir(parents=True)
            out.metrics.write_text(json.dumps(metrics))
    return Run(run_dir)


def selected_metrics(total: int, chosen: int, stopped: bool, seconds: float, held_out: int = 20) -> dict:
    """finetune's metrics.json of a run with model selection on `held_out` examples."""
    return {"steps": chosen if stopped else total, "train_seconds": seconds, "validation_examples": held_out,
            "budget": {"total_steps": total, "trained_steps": chosen + 30 if stopped else total,
                       "chosen_step": chosen, "stopped_early": stopped, "validation_score": 0.75}}


HELD_OUT_LABELS = np.array([5, 6, 7, 8])
HELD_OUT_TEACHER = {"losses": np.array([1.0, 1.0, 3.0, 3.0], np.float32), "predictions": np.array([5, 6, 0, 0])}


def planted_validation(name: str, losses: list[float], predictions: list[int], labels=HELD_OUT_LABELS,
                       targets: bool = True) -> dict:
    """A `run_summary`-shaped run with distil train's validation figures and (`targets`) per-target arrays: four
    held-out targets per set of masks, the teacher right on the first two of the uniform ones. The smoothed masks
    are harder: 2 more loss on each target, and no prediction right, the student's nor the teacher's."""
    arrays, validation = {}, {"smoothing_exponent": 0.7, "student": {}, "teacher": {}}
    for kind, (more_loss, shift) in {"uniform": (0, 0), "smoothed": (2, 100)}.items():  # shifted: never the label
        student_losses = np.asarray(losses, np.float32) + more_loss
        student_predictions = np.asarray(predictions) + shift
        teacher_losses = HELD_OUT_TEACHER["losses"] + more_loss
        teacher_predictions = HELD_OUT_TEACHER["predictions"] + shift
        arrays |= {f"{kind}_labels": labels, f"student_{kind}_losses": student_losses,
                   f"student_{kind}_predictions": student_predictions, f"teacher_{kind}_losses": teacher_losses,
                   f"teacher_{kind}_predictions": teacher_predictions}
        figures = {"student": {"mlm_loss": float(student_losses.mean()),
                               "mlm_accuracy": float(np.mean(student_predictions == labels)),
                               "teacher_agreement": float(np.mean(student_predictions == teacher_predictions))},
                   "teacher": {"mlm_loss": float(teacher_losses.mean()),
                               "mlm_accuracy": float(np.mean(teacher_predictions == labels))}}
        for model, found in figures.items():
            (validation[model] if kind == "smoothed" else validation[model].setdefault("uniform", {})).update(found)
    return {"name": name, "validation": validation, "validation_targets": arrays if targets else None}


def inject_non_finite_losses(monkeypatch, steps=None) -> None:
    """Make every loss term of the micro batches of the given (1-based) optimizer `steps` NaN (None: of every step),
    in whichever stage trains: the engine's step sees what a diverging model would give it."""
    from distilbert_cli.training import engine

    real_train_step = engine.train_step

    def train_step(job, settings, state, accelerator, loader, metrics, step):
        if steps is not None and step + 1 not in steps:
            return real_train_step(job, settings, state, accelerator, loader, metrics, step)
        real_loss = job.loss
        job.loss = lambda batch: {name: value * float("nan") for name, value in real_loss(batch).items()}
        try:
            return real_train_step(job, settings, state, accelerator, loader, metrics, step)
        finally:
            job.loss = real_loss

    monkeypatch.setattr(engine, "train_step", train_step)
