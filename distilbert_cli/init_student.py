"""`distil init-student`: build the student from the teacher (layer selection, embeddings, MLM head).

    distil init-student run_dir=runs/exp1                                  # bert-base-uncased -> DistilBERT
    distil init-student init=explicit init.layers=[0,2,4,7,9,11]
    distil init-student teacher=roberta_base student=same_arch             # a DistilRoBERTa-style student
    distil init-student init.strategy=random                               # the paper's ablation

Writes `<run_dir>/init-student/model/` (safetensors weights, config, tokenizer), loadable with
`AutoModelForMaskedLM.from_pretrained`, and records in the stage manifest the teacher, whether it has an
MLM head, the layer map, the copy choices and the parameter counts of teacher and student.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from distilbert_cli.errors import UsageError
from distilbert_cli.models import load_config, load_model, load_tokenizer
from distilbert_cli.rundir import open_stage

log = logging.getLogger(__name__)

STRATEGIES = ("every_other", "uniform", "first_k", "last_k", "explicit", "random")
ARCHS = ("distilbert", "same_arch")
WIDTH_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size")

# The BERT-family teachers (layers at <base>.encoder.layer.<i>, BERT's layer structure) and where each keeps
# its MLM head's transform (the dense + LayerNorm before the decoder).
MLM_HEAD_TRANSFORM = {
    "bert": ("cls.predictions.transform.",),
    "roberta": ("lm_head.dense.", "lm_head.layer_norm."),
    "xlm-roberta": ("lm_head.dense.", "lm_head.layer_norm."),
    "camembert": ("lm_head.dense.", "lm_head.layer_norm."),
}

# DistilBertForMaskedLM module <- BertForMaskedLM module ({i}: the layer index).
DISTILBERT_FROM_BERT = {
    "distilbert.embeddings.word_embeddings": "bert.embeddings.word_embeddings",
    "distilbert.embeddings.position_embeddings": "bert.embeddings.position_embeddings",
    "distilbert.embeddings.LayerNorm": "bert.embeddings.LayerNorm",
    "distilbert.transformer.layer.{i}.attention.q_lin": "bert.encoder.layer.{i}.attention.self.query",
    "distilbert.transformer.layer.{i}.attention.k_lin": "bert.encoder.layer.{i}.attention.self.key",
    "distilbert.transformer.layer.{i}.attention.v_lin": "bert.encoder.layer.{i}.attention.self.value",
    "distilbert.transformer.layer.{i}.attention.out_lin": "bert.encoder.layer.{i}.attention.output.dense",
    "distilbert.transformer.layer.{i}.sa_layer_norm": "bert.encoder.layer.{i}.attention.output.LayerNorm",
    "distilbert.transformer.layer.{i}.ffn.lin1": "bert.encoder.layer.{i}.intermediate.dense",
    "distilbert.transformer.layer.{i}.ffn.lin2": "bert.encoder.layer.{i}.output.dense",
    "distilbert.transformer.layer.{i}.output_layer_norm": "bert.encoder.layer.{i}.output.LayerNorm",
    "vocab_transform": "cls.predictions.transform.dense",
    "vocab_layer_norm": "cls.predictions.transform.LayerNorm",
    "vocab_projector": "cls.predictions.decoder",
}
# DistilBERT hard-codes its LayerNorm epsilon.
DISTILBERT_LAYER_NORM_EPS = 1e-12
# DistilBERT ignores segments, so its tokenizer does not produce token_type_ids (as distilbert-base-uncased's).
DISTILBERT_INPUT_NAMES = ["input_ids", "attention_mask"]

_LAYER_INDEX = re.compile(r"\.layer\.(\d+)\.")


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
        return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]
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


def require_bert_family(teacher_config, name_or_path: str) -> None:
    if teacher_config.model_type not in MLM_HEAD_TRANSFORM:
        raise UsageError(f"teacher {name_or_path!r} is a {teacher_config.model_type!r} checkpoint, not BERT-family "
                         f"(supported: {', '.join(MLM_HEAD_TRANSFORM)})")


def teacher_reference(name_or_path: str) -> str:
    """How later stages find the teacher again: the absolute path of a local directory, else the hub name."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def load_teacher(name_or_path: str, trust_remote_code: bool = False, **kwargs):
    """The teacher as an AutoModelForMaskedLM, and whether its checkpoint has an MLM head.

    A plain encoder (e.g. a sentence-transformers BertModel) loads too: transformers then initialises the head
    at random, and the head's weights show up as missing from the checkpoint.
    """
    from transformers import AutoModelForMaskedLM

    teacher, loading_info = load_model(AutoModelForMaskedLM, name_or_path, trust_remote_code, role="teacher",
                                       output_loading_info=True, **kwargs)
    base = f"{teacher.base_model_prefix}."
    return teacher, all(key.startswith(base) for key in loading_info["missing_keys"])


def student_config(teacher_config, arch: str, num_layers: int, hidden_size: int | None = None,
                   num_attention_heads: int | None = None, intermediate_size: int | None = None):
    """The student's transformers config: DistilBERT (`distilbert`) or the teacher's own (`same_arch`) class.

    Width arguments left None keep the teacher's; a None intermediate size scales with the hidden size.
    """
    from transformers import DistilBertConfig

    if arch not in ARCHS:
        raise UsageError(f"unknown student.arch {arch!r} (choose from {', '.join(ARCHS)})")
    hidden = hidden_size or teacher_config.hidden_size
    heads = num_attention_heads or teacher_config.num_attention_heads
    intermediate = intermediate_size or teacher_config.intermediate_size * hidden // teacher_config.hidden_size
    if hidden % heads:
        raise UsageError(f"the student's hidden size {hidden} is not divisible by its {heads} attention heads "
                         f"(set student.num_attention_heads)")
    if arch == "same_arch":
        config = copy.deepcopy(teacher_config)
        config.num_hidden_layers, config.hidden_size = num_layers, hidden
        config.num_attention_heads, config.intermediate_size = heads, intermediate
        return config
    if teacher_config.model_type != "bert":
        raise UsageError(f"student=distilbert needs a BERT teacher, not {teacher_config.model_type!r}: use "
                         f"student=same_arch for a {teacher_config.model_type} student with fewer layers")
    if teacher_config.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
        log.warning("the teacher's LayerNorm epsilon is %g; DistilBERT's is fixed at %g",
                    teacher_config.layer_norm_eps, DISTILBERT_LAYER_NORM_EPS)
    return DistilBertConfig(
        vocab_size=teacher_config.vocab_size, max_position_embeddings=teacher_config.max_position_embeddings,
        sinusoidal_pos_embds=False, n_layers=num_layers, n_heads=heads, dim=hidden, hidden_dim=intermediate,
        dropout=teacher_config.hidden_dropout_prob, attention_dropout=teacher_config.attention_probs_dropout_prob,
        activation=teacher_config.hidden_act, initializer_range=teacher_config.initializer_range,
        pad_token_id=teacher_config.pad_token_id, tie_word_embeddings=teacher_config.tie_word_embeddings,
    )


def _teacher_name(student_name: str, layer_map: Sequence[int], renames: dict[str, str] | None) -> str:
    """The teacher tensor a student tensor is copied from (`renames` maps modules; None: same names)."""
    match = _LAYER_INDEX.search(student_name)
    template = _LAYER_INDEX.sub(".layer.{i}.", student_name, count=1)
    module, param = template.rsplit(".", 1)
    teacher_template = f"{renames[module] if renames is not None else module}.{param}"
    return teacher_template.format(i=layer_map[int(match.group(1))]) if match else teacher_template


def init_student_weights(student, teacher, layer_map: Sequence[int], teacher_has_mlm_head: bool,
                         fold_token_type_embeddings: bool, copy_mlm_head_transform: bool) -> tuple[bool, bool]:
    """Copy embeddings, the teacher layers `layer_map` and the MLM head into `student`, in place.

    The head's decoder is copied when the teacher has a head, its transform also when `copy_mlm_head_transform`;
    otherwise the student keeps its own fresh initialisation there. Returns whether token_type_embeddings[0]
    was folded into the position embeddings and whether the head's transform was copied.
    """
    distilbert = student.config.model_type == "distilbert"
    renames = DISTILBERT_FROM_BERT if distilbert else None
    transform_prefixes = MLM_HEAD_TRANSFORM[teacher.config.model_type]
    copy_transform = teacher_has_mlm_head and copy_mlm_head_transform
    base = f"{student.base_model_prefix}."
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = _teacher_name(name, layer_map, renames)
            if not name.startswith(base):  # the MLM head
                copied = copy_transform if source.startswith(transform_prefixes) else teacher_has_mlm_head
                if not copied:
                    continue
            tensor.copy_(teacher_state[source])
        fold = distilbert and fold_token_type_embeddings
        if fold:
            student.base_model.embeddings.position_embeddings.weight += (
                teacher.base_model.embeddings.token_type_embeddings.weight[0])
    return fold, copy_transform


def count_parameters(model) -> int:
    """Distinct parameters (tied input and output embeddings count once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _width_changes(student: DictConfig, teacher_config) -> list[str]:
    return [f"student.{key}={student[key]}" for key in WIDTH_KEYS
            if student[key] is not None and student[key] != getattr(teacher_config, key)]


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """Build the student from `cfg.teacher` into `<run_dir>/init-student/model/`; returns that directory."""
    from transformers import AutoModelForMaskedLM

    teacher_name, trust_remote_code = cfg.teacher.name_or_path, cfg.teacher.trust_remote_code
    teacher_config = load_config(teacher_name, trust_remote_code, role="teacher")
    require_bert_family(teacher_config, teacher_name)
    layer_map = select_layers(cfg.init.strategy, teacher_config.num_hidden_layers, cfg.student.num_layers,
                              cfg.init.layers)
    config = student_config(teacher_config, cfg.student.arch, cfg.student.num_layers, cfg.student.hidden_size,
                            cfg.student.num_attention_heads, cfg.student.intermediate_size)
    copies_teacher = cfg.init.strategy != "random"
    if copies_teacher and (changes := _width_changes(cfg.student, teacher_config)):
        raise UsageError(f"{' '.join(changes)}: a student narrower than the teacher can only be built with "
                         f"init.strategy=random (the teacher's weights do not fit it)")
    tokenizer = load_tokenizer(teacher_name, trust_remote_code, role="teacher tokenizer")

    with open_stage(cfg, "init-student", overrides) as stage:
        stage.use_model(teacher_name, "teacher")
        teacher, teacher_has_mlm_head = load_teacher(teacher_name, trust_remote_code)
        if not teacher_has_mlm_head:
            log.warning("the teacher has no MLM head: the student gets a fresh one, and distil train must run with "
                        "loss.alpha_ce=0 (there are no teacher logits to distill)")
        torch.manual_seed(cfg.seed)
        student = AutoModelForMaskedLM.from_config(config)
        folded, copied_transform = False, False
        if copies_teacher:
            folded, copied_transform = init_student_weights(
                student, teacher, layer_map, teacher_has_mlm_head, cfg.fold_token_type_embeddings,
                cfg.copy_mlm_head_transform)
        param_counts = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
        log.info("%s student, %d layers <- teacher layers %s (%s): %.1fM parameters vs %.1fM for the teacher",
                 type(student).__name__, len(layer_map), layer_map, cfg.init.strategy,
                 param_counts["student"] / 1e6, param_counts["teacher"] / 1e6)

        model_dir = stage.path / "model"
        student.save_pretrained(model_dir)
        if cfg.student.arch == "distilbert":
            # save_pretrained writes the tokenizer's init kwargs, so the input names are recorded there too.
            tokenizer.model_input_names = list(DISTILBERT_INPUT_NAMES)
            tokenizer.init_kwargs["model_input_names"] = list(DISTILBERT_INPUT_NAMES)
        tokenizer.save_pretrained(model_dir)
        stage.update(
            teacher=teacher_reference(teacher_name),
            teacher_has_mlm_head=teacher_has_mlm_head,
            layer_map=layer_map,
            strategy=cfg.init.strategy,
            student_arch=cfg.student.arch,
            student_class=type(student).__name__,
            fold_token_type_embeddings=folded,
            copied_mlm_head_transform=copied_transform,
            param_counts=param_counts,
        )
    return model_dir
