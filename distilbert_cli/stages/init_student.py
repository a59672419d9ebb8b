"""`distil init-student`: build the student from the teacher (layer selection, embeddings, MLM head).

    distil init-student run_dir=runs/exp1                                  # bert-base-uncased -> 6-layer DistilBERT
    distil init-student init=explicit init.layers=[0,2,4,7,9,11]
    distil init-student teacher=roberta_base                               # a DistilRoBERTa-style student
    distil init-student teacher.name_or_path=microsoft/deberta-v3-base     # any family in models/families.py
    distil init-student init.strategy=random                               # the paper's ablation
    distil init-student +experiment=mobilebert                             # a MobileBERT as deep as the teacher
    distil init-student student=bilstm                                     # Tang et al.'s BiLSTM (task-distill)

Defaults: half the teacher's layers (`student.num_layers: null`), DistilBERT classes for a BERT teacher and the
teacher's own class for every other family (`student.arch: auto`).

Writes `<run_dir>/init-student/model/` (safetensors weights, config, tokenizer), loadable with
`AutoModelForMaskedLM.from_pretrained` (a BiLSTM with `AutoModel`, its embeddings the teacher's input embeddings
projected down by PCA, or random with init=random), and records in the stage manifest the teacher, whether it has an
MLM head, the layer map, the copy choices and the parameter counts of teacher and student
(`artifacts.InitStudentFacts`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import TEACHER_FAMILIES, family_of
from distilbert_cli.models.loading import count_parameters, load_config, load_masked_lm, load_tokenizer
from distilbert_cli.models.student import (
    RANDOM_ONLY_ARCHS,
    WIDTH_KEYS,
    default_num_layers,
    init_student_weights,
    input_names,
    resolve_arch,
    select_layers,
    student_config,
    widths,
)
from distilbert_cli.rundir import Run
from distilbert_cli.schema import InitStudent

log = logging.getLogger(__name__)


def teacher_reference(name_or_path: str) -> str:
    """How later stages find the teacher again: the absolute path of a local directory, else the hub name."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def run(cfg: InitStudent, overrides: Sequence[str] = ()) -> Path:
    """Build the student from `cfg.teacher` into `<run_dir>/init-student/model/`; returns that directory."""
    from transformers import AutoModelForMaskedLM

    if cfg.student.arch == "bilstm":
        return bilstm_student(cfg, overrides)
    teacher_name, trust = cfg.teacher.name_or_path, cfg.trust_remote_code
    teacher_config = load_config(teacher_name, trust, role="teacher")
    family = family_of(teacher_config, role=f"teacher {teacher_name!r}", among=TEACHER_FAMILIES)
    arch = resolve_arch(cfg.student.arch, family)
    n_teacher = teacher_config.num_hidden_layers
    num_layers = cfg.student.num_layers
    if num_layers is None:
        num_layers = default_num_layers(n_teacher, cfg.init.strategy, cfg.init.layers, arch)
    layer_map = select_layers(cfg.init.strategy, n_teacher, num_layers, cfg.init.layers)
    student_config(teacher_config, arch, layer_map, cfg.student.hidden_size, cfg.student.num_attention_heads,
                   cfg.student.intermediate_size)  # its checks, before the stage opens
    copies_teacher = cfg.init.strategy != "random"
    if copies_teacher and arch in RANDOM_ONLY_ARCHS:
        raise UsageError(f"student.arch={arch} has no layer the teacher's weights fit: use init.strategy=random "
                         "(e.g. +experiment=mobilebert)")
    teacher_widths = widths(teacher_config, family)
    resized = {key: getattr(cfg.student, key) for key in WIDTH_KEYS
               if getattr(cfg.student, key) is not None and getattr(cfg.student, key) != teacher_widths[key]}
    if copies_teacher and resized:
        wider = [value > teacher_widths[key] for key, value in resized.items()]
        shape = "wider than" if all(wider) else "narrower than" if not any(wider) else "of other widths than"
        raise UsageError(", ".join(f"student.{key}={value} (the teacher's {teacher_widths[key]})"
                                   for key, value in resized.items())
                         + f": a student {shape} the teacher can only be built with init.strategy=random (the "
                           "teacher's weights do not fit it)")
    tokenizer = load_tokenizer(teacher_name, trust, role="teacher tokenizer")

    with Run.of(cfg).open_stage(artifacts.INIT_STUDENT, cfg, overrides) as stage:
        stage.use_model(teacher_name, "teacher")
        teacher, teacher_has_mlm_head = load_masked_lm(teacher_name, trust, role="teacher")
        # As loaded: loading may have picked another head layout (DeBERTa's legacy=false).
        config = student_config(teacher.config, arch, layer_map, cfg.student.hidden_size,
                                cfg.student.num_attention_heads, cfg.student.intermediate_size)
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

        model_dir = artifacts.InitStudentOutputs(stage.path).model
        stage.expect(*artifacts.InitStudentOutputs(stage.path).files)
        student.save_pretrained(model_dir)
        if (names := input_names(arch)) is not None:
            # save_pretrained writes the tokenizer's init kwargs, so the input names are recorded there too.
            tokenizer.model_input_names = names
            tokenizer.init_kwargs["model_input_names"] = list(names)
        tokenizer.save_pretrained(model_dir)
        stage.update(**artifacts.InitStudentFacts(
            teacher=teacher_reference(teacher_name), teacher_has_mlm_head=teacher_has_mlm_head, layer_map=layer_map,
            strategy=cfg.init.strategy, student_arch=arch, student_class=type(student).__name__,
            fold_token_type_embeddings=folded, copied_mlm_head_transform=copied_transform,
            param_counts=param_counts).as_manifest())
    return model_dir


def bilstm_student(cfg: InitStudent, overrides: Sequence[str]) -> Path:
    """student=bilstm: Tang et al.'s BiLSTM encoder over the teacher tokenizer's ids, its embeddings the teacher's input
    embeddings projected onto their `student.embedding_size` principal components (init=random: random ones)."""
    from distilbert_cli.models.bilstm import BiLSTMModel, bilstm_config, projected_embeddings

    teacher_name, trust = cfg.teacher.name_or_path, cfg.trust_remote_code
    if cfg.init.strategy not in ("every_other", "random"):
        raise UsageError(f"init.strategy={cfg.init.strategy}: a BiLSTM student has no teacher layers to choose; it "
                         "takes the teacher's input embeddings (projected down), or none with init=random")
    load_config(teacher_name, trust, role="teacher")
    tokenizer = load_tokenizer(teacher_name, trust, role="teacher tokenizer")
    with Run.of(cfg).open_stage(artifacts.INIT_STUDENT, cfg, overrides) as stage:
        stage.use_model(teacher_name, "teacher")
        teacher, teacher_has_mlm_head = load_masked_lm(teacher_name, trust, role="teacher")
        embeddings = teacher.get_input_embeddings().weight.detach()
        copies_teacher = cfg.init.strategy != "random"
        if copies_teacher and cfg.student.embedding_size > embeddings.size(1):
            raise UsageError(f"student.embedding_size={cfg.student.embedding_size} exceeds the teacher's "
                             f"{embeddings.size(1)}-wide input embeddings it is projected from (or use init=random)")
        torch.manual_seed(cfg.seed)
        student = BiLSTMModel(bilstm_config(tokenizer, embeddings.size(0), cfg.student))
        if copies_teacher:
            with torch.no_grad():
                student.embeddings.weight.copy_(projected_embeddings(embeddings, cfg.student.embedding_size))
        param_counts = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
        log.info("BiLSTM student (%d-wide embeddings%s, %d hidden per direction): %.1fM parameters vs %.1fM for the "
                 "teacher", cfg.student.embedding_size, ", the teacher's projected by PCA" if copies_teacher else
                 ", random", cfg.student.hidden_size, param_counts["student"] / 1e6, param_counts["teacher"] / 1e6)
        model_dir = artifacts.InitStudentOutputs(stage.path).model
        stage.expect(*artifacts.InitStudentOutputs(stage.path).files)
        student.save_pretrained(model_dir)
        tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token types: see models/bilstm.py
        tokenizer.init_kwargs["model_input_names"] = list(tokenizer.model_input_names)
        tokenizer.save_pretrained(model_dir)
        stage.update(**artifacts.InitStudentFacts(
            teacher=teacher_reference(teacher_name), teacher_has_mlm_head=teacher_has_mlm_head, layer_map=[],
            strategy=cfg.init.strategy, student_arch="bilstm", student_class=type(student).__name__,
            fold_token_type_embeddings=False, copied_mlm_head_transform=False,
            param_counts=param_counts).as_manifest())
    return model_dir
