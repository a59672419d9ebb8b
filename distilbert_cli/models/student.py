"""Building a student from a teacher: which teacher layers it starts from, its config, and the weight copy.

Student kinds (`student.arch`): `distilbert` (DistilBERT classes: no token-type embeddings, no pooler; the
paper's student, from a family with a DistilBERT name map), `same_arch` (the teacher's own class with fewer
layers), `mobilebert` (transformers' MobileBERT classes, built at random: nothing of the teacher fits them) and
`auto` (the family's `auto_student`: DistilBERT for BERT, the teacher's own class otherwise). The default depth is
half the teacher's (`default_num_layers`; MobileBERT: the teacher's). Adding a kind = an entry in STUDENT_ARCHS
(its config builder) and, if its parameter names differ from the teacher's, a name map in the family table.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import DISTILBERT, TEACHER_FAMILIES, Family, family_of, family_of_model

log = logging.getLogger(__name__)

STRATEGIES = ("every_other", "uniform", "first_k", "last_k", "explicit", "random")
WIDTH_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size")
# DistilBERT hard-codes its LayerNorm epsilon.
DISTILBERT_LAYER_NORM_EPS = 1e-12
MOBILEBERT_EMBEDDING_SIZE = 128


def select_layers(strategy: str, n_teacher: int, n_student: int, layers: Sequence[int] | None = None
                  ) -> list[int | None]:
    """Teacher layer for each student layer (`None`: random init) under `strategy`; see conf/init/*.yaml."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown init.strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if layers is not None and strategy != "explicit":
        raise UsageError(f"init.layers is only read by init.strategy=explicit, not {strategy} "
                         f"(use init=explicit init.layers=[...])")
    if type(n_student) is not int or not 1 <= n_student <= n_teacher:
        raise UsageError(f"student.num_layers={n_student}: the student needs 1 to {n_teacher} layers "
                         f"(the teacher has {n_teacher})")
    if strategy == "random":
        return [None] * n_student
    if strategy == "first_k":
        return list(range(n_student))
    if strategy == "last_k":
        return list(range(n_teacher - n_student, n_teacher))
    if strategy == "uniform":
        return uniform_layers(n_teacher, n_student)
    if strategy == "every_other":
        step = n_teacher // n_student
        bottom = [i * step for i in range((n_student + 1) // 2)]
        top = [n_teacher - 1 - i * step for i in range(n_student // 2)]
        return bottom + top[::-1]
    if layers is None:
        raise UsageError("init.strategy=explicit needs init.layers, e.g. init.layers=[0,2,4,7,9,11]")
    layers = list(layers)
    if len(layers) != n_student:
        raise UsageError(f"init.layers={layers} has {len(layers)} layers but student.num_layers={n_student}")
    if bad := [layer for layer in layers if type(layer) is not int or not 0 <= layer < n_teacher]:
        raise UsageError(f"init.layers={layers}: teacher layers are 0..{n_teacher - 1}, got {bad}")
    return layers


def uniform_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers ending at the last one (TinyBERT's map): (i + 1) * N // M - 1."""
    return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]


def default_num_layers(n_teacher: int, strategy: str, layers: Sequence[int] | None, arch: str = "auto") -> int:
    """`student.num_layers: null`: as many layers as `init.layers` lists for init=explicit; the teacher's depth for
    a MobileBERT student (its feature maps match the teacher's layer for layer); else half the teacher's, rounded
    down (the paper's 12 -> 6), at least 1."""
    if strategy == "explicit" and layers is not None:
        return len(layers)
    if arch == "mobilebert":
        return n_teacher
    return max(1, n_teacher // 2)


def resolve_arch(arch: str, family: Family) -> str:
    """The student kind `student.arch` names; `auto` is the family's (DistilBERT for BERT, else its own class)."""
    if arch == "auto":
        return family.auto_student
    if arch not in STUDENT_ARCHS:
        raise UsageError(f"unknown student.arch {arch!r} (choose from auto, {', '.join(STUDENT_ARCHS)})")
    return arch


def widths(config, family: Family) -> dict[str, int]:
    """A config's width settings under their common names (WIDTH_KEYS)."""
    return {"hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
            "intermediate_size": getattr(config, family.intermediate_size)}


def _same_arch_config(teacher_config, family: Family, layer_map: Sequence[int | None], hidden: int, heads: int,
                      intermediate: int):
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers, config.hidden_size, config.num_attention_heads = len(layer_map), hidden, heads
    setattr(config, family.intermediate_size, intermediate)
    for key in family.per_layer_config:
        # A copied layer keeps its teacher layer's setting; a random one takes the pattern at its own depth.
        per_layer = getattr(teacher_config, key)
        setattr(config, key, [per_layer[i if teacher is None else teacher] for i, teacher in enumerate(layer_map)])
    return config


def _distilbert_config(teacher_config, family: Family, layer_map: Sequence[int | None], hidden: int, heads: int,
                       intermediate: int):
    from transformers import DistilBertConfig

    if family is DISTILBERT:
        return _same_arch_config(teacher_config, family, layer_map, hidden, heads, intermediate)
    if not family.distilbert_names:
        raise UsageError(f"student=distilbert needs a BERT or DistilBERT teacher, not {teacher_config.model_type!r}: "
                         f"use student=auto (or same_arch) for a {teacher_config.model_type} student with fewer layers")
    if teacher_config.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
        log.warning("the teacher's LayerNorm epsilon is %g; DistilBERT's is fixed at %g",
                    teacher_config.layer_norm_eps, DISTILBERT_LAYER_NORM_EPS)
    return DistilBertConfig(
        vocab_size=teacher_config.vocab_size, max_position_embeddings=teacher_config.max_position_embeddings,
        sinusoidal_pos_embds=False, n_layers=len(layer_map), n_heads=heads, dim=hidden, hidden_dim=intermediate,
        dropout=teacher_config.hidden_dropout_prob, attention_dropout=teacher_config.attention_probs_dropout_prob,
        activation=teacher_config.hidden_act, initializer_range=teacher_config.initializer_range,
        pad_token_id=teacher_config.pad_token_id, tie_word_embeddings=teacher_config.tie_word_embeddings,
    )


def _mobilebert_config(teacher_config, family: Family, layer_map: Sequence[int | None], hidden: int, heads: int,
                       intermediate: int):
    """MobileBERT blocks whose inter-block width is the teacher's hidden size, so every layer's output (its feature
    map) matches the teacher's without a projection; `hidden` is the bottleneck (intra-block) width the attention
    and the four stacked FFNs of `intermediate` width run at. The rest is MobileBERT's: 128-wide embeddings
    (at most the inter-block width, which the MLM head's decoder extends them to) widened by a trigram
    convolution, NoNorm, ReLU, queries and keys from a shared bottleneck."""
    from transformers import MobileBertConfig

    return MobileBertConfig(
        vocab_size=teacher_config.vocab_size, max_position_embeddings=teacher_config.max_position_embeddings,
        type_vocab_size=teacher_config.type_vocab_size, pad_token_id=teacher_config.pad_token_id,
        hidden_size=teacher_config.hidden_size, num_hidden_layers=len(layer_map), intra_bottleneck_size=hidden,
        num_attention_heads=heads, intermediate_size=intermediate, initializer_range=teacher_config.initializer_range,
        embedding_size=min(MOBILEBERT_EMBEDDING_SIZE, teacher_config.hidden_size),
    )


STUDENT_ARCHS: dict[str, Callable] = {"distilbert": _distilbert_config, "same_arch": _same_arch_config,
                                      "mobilebert": _mobilebert_config}
# Kinds with no counterpart of the teacher's weights: built with init.strategy=random only.
RANDOM_ONLY_ARCHS = ("mobilebert",)


def student_config(teacher_config, arch: str, layer_map: Sequence[int | None], hidden_size: int | None = None,
                   num_attention_heads: int | None = None, intermediate_size: int | None = None):
    """The student's transformers config: `arch` (auto, distilbert, same_arch or mobilebert, whose `hidden_size` is
    its bottleneck width) with one layer per entry of `layer_map` (the teacher layer it starts from, None: random).

    Width arguments left None keep the teacher's; a None intermediate size scales with the hidden size.
    """
    family = family_of(teacher_config, role="the teacher", among=TEACHER_FAMILIES)
    arch = resolve_arch(arch, family)
    teacher = widths(teacher_config, family)
    hidden = hidden_size or teacher["hidden_size"]
    heads = num_attention_heads or teacher["num_attention_heads"]
    intermediate = intermediate_size or teacher["intermediate_size"] * hidden // teacher["hidden_size"]
    if hidden % heads:
        raise UsageError(f"the student's hidden size {hidden} is not divisible by its {heads} attention heads "
                         f"(set student.num_attention_heads)")
    return STUDENT_ARCHS[arch](teacher_config, family, layer_map, hidden, heads, intermediate)


def teacher_parameter(student_name: str, student: Family, teacher: Family, layer_map: Sequence[int]) -> str:
    """The teacher parameter a student parameter is copied from: renamed through the teacher family's DistilBERT
    map for a DistilBERT student, the same name otherwise, with the student's layer index mapped."""
    match = student.layer_pattern().match(student_name)
    template = student.layer_pattern().sub(f"{student.layers}.{{i}}.", student_name, count=1)
    if student is not teacher:
        module, param = template.rsplit(".", 1)
        template = f"{teacher.distilbert_names[module]}.{param}"
    return template.format(i=layer_map[int(match.group(1))]) if match else template


def init_student_weights(student: nn.Module, teacher: nn.Module, layer_map: Sequence[int], teacher_has_mlm_head: bool,
                         fold_token_type_embeddings: bool, copy_mlm_head_transform: bool) -> tuple[bool, bool]:
    """Copy embeddings, the teacher layers `layer_map` and the MLM head into `student`, in place.

    The head's decoder is copied when the teacher has a head, its transform also when `copy_mlm_head_transform`;
    otherwise the student keeps its own fresh initialisation there. A student tensor without a teacher
    counterpart, and a tensor of a copied teacher layer without a student counterpart (ModernBERT's first layer
    has no attn_norm), are named in a warning. Returns whether token_type_embeddings[0] was folded into the
    position embeddings and whether the head's transform was copied.
    """
    student_family, teacher_family = family_of_model(student, "student"), family_of_model(teacher, "teacher")
    copy_transform = teacher_has_mlm_head and copy_mlm_head_transform
    base = f"{student.base_model_prefix}."
    teacher_state = teacher.state_dict()
    fresh, used = [], set()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = teacher_parameter(name, student_family, teacher_family, layer_map)
            if not name.startswith(base):  # the MLM head
                copied = copy_transform if source.startswith(teacher_family.head_transform) else teacher_has_mlm_head
                if not copied:
                    continue
            if source not in teacher_state:
                fresh.append(name)
                continue
            tensor.copy_(teacher_state[source])
            used.add(source)
        # A student without segment embeddings gets segment 0's row added to its positions.
        fold = (fold_token_type_embeddings and student_family.token_type_embeddings is None
                and teacher_family.token_type_embeddings is not None)
        if fold:
            student.get_submodule(student_family.position_embeddings).weight += (
                teacher.get_submodule(teacher_family.token_type_embeddings).weight[0])
    pattern = teacher_family.layer_pattern()
    dropped = [name for name in teacher_state if name not in used and (match := pattern.match(name))
               and int(match.group(1)) in layer_map]
    if fresh or dropped:
        log.warning("the student's layers differ from the teacher's: kept fresh (nothing to copy): %s; not copied "
                    "(no place in the student): %s", ", ".join(fresh) or "nothing", ", ".join(dropped) or "nothing")
    return fold, copy_transform


def input_names(arch: str) -> list[str] | None:
    """The tokenizer inputs of a student kind that differs from its teacher (DistilBERT: no token_type_ids), or
    None to keep the teacher tokenizer's."""
    return list(DISTILBERT.input_names) if arch == "distilbert" else None
