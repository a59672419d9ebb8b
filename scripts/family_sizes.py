"""Parameter counts of the default student of each teacher family, beside the teacher's, for the base-sized
configs of the released checkpoints (written out here: no hub access, shapes only on the meta device).

    .venv/bin/python scripts/family_sizes.py

Each student is what `distil init-student teacher.name_or_path=<hub name>` builds with the defaults
(`student.arch=auto`, `student.num_layers=null`, `init=every_other`): DistilBERT classes for BERT, the teacher's
own class with half its layers for every other family. Counts are as init-student's manifest records them
(`param_counts`: the masked LM, tied input/output embeddings counted once). ELECTRA's discriminator has no MLM
head: it is counted, as init-student loads it, with the generator-style head the student gets.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    CamembertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from distilbert_cli.models.loading import count_parameters
from distilbert_cli.models.student import default_num_layers, select_layers, student_config

BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
_ROBERTA = {"max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1, "layer_norm_eps": 1e-5, **BASE}
# Hub name -> its config.json's shape-relevant values.
BASE_CONFIGS = {
    "bert-base-uncased": BertConfig(**BASE),
    "FacebookAI/roberta-base": RobertaConfig(vocab_size=50265, bos_token_id=0, eos_token_id=2, **_ROBERTA),
    "FacebookAI/xlm-roberta-base": XLMRobertaConfig(vocab_size=250002, bos_token_id=0, eos_token_id=2, **_ROBERTA),
    "almanach/camembert-base": CamembertConfig(vocab_size=32005, bos_token_id=5, eos_token_id=6, **_ROBERTA),
    "google/electra-base-generator": ElectraConfig(embedding_size=768, hidden_size=256, num_hidden_layers=12,
                                                   num_attention_heads=4, intermediate_size=1024),
    "google/electra-base-discriminator": ElectraConfig(embedding_size=768, **BASE),
    "microsoft/deberta-v3-base": DebertaV2Config(
        vocab_size=128100, **BASE, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
        position_biased_input=False, type_vocab_size=0),
    "answerdotai/ModernBERT-base": ModernBertConfig(
        vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
        max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128, pad_token_id=50283,
        bos_token_id=50281, eos_token_id=50282, cls_token_id=50281, sep_token_id=50282),
    "distilbert-base-uncased": DistilBertConfig(dim=768, n_layers=6, n_heads=12, hidden_dim=3072),
}


def main() -> None:
    print("| teacher (base config) | teacher | layers | params | student (defaults) | teacher layers kept | params "
          "| student/teacher |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    notes = []
    for name, config in BASE_CONFIGS.items():
        layers = config.num_hidden_layers
        layer_map = select_layers("every_other", layers, default_num_layers(layers, "every_other", None))
        with torch.device("meta"):
            teacher = AutoModelForMaskedLM.from_config(config)
            student = AutoModelForMaskedLM.from_config(student_config(config, "auto", layer_map))
        teacher_params, student_params = count_parameters(teacher), count_parameters(student)
        print(f"| {name} | {type(teacher).__name__} | {layers} | {teacher_params / 1e6:.1f}M | "
              f"{type(student).__name__} | {layer_map} | {student_params / 1e6:.1f}M | "
              f"{student_params / teacher_params:.0%} |")
        if hasattr(config, "layer_types"):
            short = {"full_attention": "G", "sliding_attention": "L"}
            notes.append(f"{name}: attention per layer (G global, L local) teacher "
                         f"{''.join(short[kind] for kind in config.layer_types)}, student "
                         f"{''.join(short[kind] for kind in student.config.layer_types)}")
    print("\n".join(["", *notes]))


if __name__ == "__main__":
    main()
