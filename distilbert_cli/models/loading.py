"""Loading tokenizers and models by hub name or local directory, with user mistakes as UsageErrors: a local
checkpoint whose JSON files or safetensors headers cannot be read is refused naming the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import distilbert_cli.models.bilstm  # noqa: F401  (registers the BiLSTM with transformers' Auto classes)
from distilbert_cli.errors import UsageError, first_line, unreadable
from distilbert_cli.models.families import find_family

log = logging.getLogger(__name__)

_PATH_PREFIXES = ("/", "./", "../", "~")


def check_name_or_path(name_or_path: str, role: str) -> None:
    """A string that is clearly a filesystem path must exist; anything else is taken as a hub name."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and str(name_or_path).startswith(_PATH_PREFIXES):
        raise UsageError(f"{role} directory does not exist: {name_or_path}")


def check_readable(directory: Path) -> None:
    """Every JSON file of a local checkpoint parses and every safetensors header reads (a truncated or random
    weights file fails here; a changed byte inside the weights is the stage fingerprints' business)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(directory.iterdir()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
        except (OSError, ValueError, SafetensorError) as exc:
            raise unreadable(file, exc) from exc


def _load(loader, name_or_path: str, role: str, **kwargs):
    from safetensors import SafetensorError

    check_name_or_path(name_or_path, role)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_readable(local)
    try:
        return loader(str(local) if local.exists() else name_or_path, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        reason = first_line(exc)
        if "custom code" in reason and not kwargs.get("trust_remote_code"):
            reason = "it ships its own model code, which runs only with trust_remote_code=true"
        raise UsageError(f"cannot load {role} from {name_or_path!r}: {reason}") from exc


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, role: str = "tokenizer"):
    """The fast tokenizer of a checkpoint (the slow Python tokenizers are the reference's bottleneck)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, name_or_path, role, use_fast=True,
                      trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise UsageError(f"{role} {name_or_path!r} has no fast (Rust) tokenizer")
    return tokenizer


def load_config(name_or_path: str, trust_remote_code: bool = False, role: str = "model"):
    from transformers import AutoConfig

    return _load(AutoConfig.from_pretrained, name_or_path, role, trust_remote_code=trust_remote_code)


def load_model(auto_class, name_or_path: str, trust_remote_code: bool = False, role: str = "model", **kwargs):
    """`auto_class.from_pretrained` (e.g. AutoModelForMaskedLM) with missing or foreign checkpoints as UsageErrors.

    `attn_implementation="sdpa"` means SDPA where the architecture has it, eager elsewhere. transformers' key-by-key
    load report (and its "checkpoint seem corrupted" warning for a head the checkpoint
    never had) becomes one line naming the modules left unused and those initialised fresh: both are expected
    here (an MLM checkpoint loaded as a classifier, a plain encoder given an MLM head).
    """
    from transformers.utils import logging as hf_logging

    return_info = kwargs.pop("output_loading_info", False)
    if kwargs.get("attn_implementation") == "sdpa":
        # transformers' default: SDPA, falling back to eager for architectures without it (DeBERTa), which an
        # explicit "sdpa" would refuse.
        kwargs["attn_implementation"] = None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = _load(auto_class.from_pretrained, name_or_path, role, trust_remote_code=trust_remote_code,
                            output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["unexpected_keys"] or info["missing_keys"]:
        log.info("%s %s as %s: unused from the checkpoint: %s; initialised fresh: %s", role, name_or_path,
                 type(model).__name__, _modules(info["unexpected_keys"]), _modules(info["missing_keys"]))
    return (model, info) if return_info else model


def _modules(keys) -> str:
    """Parameter names grouped by module: "cls.predictions.transform.dense (2)"."""
    counts: dict[str, int] = {}
    for key in sorted(keys):
        module = key.rsplit(".", 1)[0]
        counts[module] = counts.get(module, 0) + 1
    return ", ".join(f"{module} ({count})" for module, count in counts.items()) or "nothing"


def count_parameters(model) -> int:
    """Distinct parameters (tied input and output embeddings count once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def load_masked_lm(name_or_path: str, trust_remote_code: bool = False, role: str = "teacher", **kwargs):
    """A checkpoint as an AutoModelForMaskedLM, and whether the checkpoint has an MLM head.

    A plain encoder (e.g. a sentence-transformers BertModel) loads too: transformers then initialises the head
    at random, and the head's weights show up as missing from the checkpoint. A family whose checkpoints come
    with another head layout (`Family.head_layouts`: DeBERTa's original `lm_predictions` head) is loaded again
    in that layout when the first finds no head.
    """
    from transformers import AutoModelForMaskedLM

    model, loading_info = load_model(AutoModelForMaskedLM, name_or_path, trust_remote_code, role=role,
                                     output_loading_info=True, **kwargs)
    family = find_family(model.config)
    for layout in family.head_layouts if family is not None and loading_info["unexpected_keys"] else ():
        if _has_head(model, loading_info):
            break
        log.info("%s %s: no MLM head in the default layout, trying %s", role, name_or_path, layout)
        model, loading_info = load_model(AutoModelForMaskedLM, name_or_path, trust_remote_code, role=role,
                                         output_loading_info=True, **layout, **kwargs)
    return model, _has_head(model, loading_info)


def _has_head(model, loading_info) -> bool:
    """Whether every parameter missing from the checkpoint is in the base model (none in the head)."""
    base = f"{model.base_model_prefix}."
    return all(key.startswith(base) for key in loading_info["missing_keys"])


def load_frozen_teacher(name_or_path: str, has_mlm_head: bool, trust_remote_code: bool, **kwargs):
    """The teacher in eval mode without gradients: a masked LM (in the head layout init-student found), or a
    plain encoder when it has no MLM head."""
    from transformers import AutoModel

    teacher = (load_masked_lm(name_or_path, trust_remote_code, **kwargs)[0] if has_mlm_head
               else load_model(AutoModel, name_or_path, trust_remote_code, role="teacher", **kwargs))
    return teacher.eval().requires_grad_(False)
