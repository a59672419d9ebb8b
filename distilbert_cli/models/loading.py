"""The one front door for reading a model, tokenizer or config, by hub name or local directory: every stage and
library function that reads one calls these functions, so each refusal is one line naming the folder.

- Missing or corrupt files: a folder without config.json, weights or tokenizer files, a config.json without a
  known `model_type`, a JSON file or safetensors header that cannot be read, a shard its index names missing.
- Pickled weights: a folder whose weights are only `pytorch_model.bin` (or `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`) is
  refused with how to convert it (unpickling can run code; torch's `weights_only` stops the code but not the
  traceback), and hub models are read from safetensors only (`use_safetensors=True`).
- Custom code: a config or tokenizer config with an `auto_map` (code shipped with the checkpoint) is refused under
  `trust_remote_code=false`, whatever its `model_type` (transformers itself would load the built-in class of a
  known type and silently ignore the shipped code).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import distilbert_cli.models.bilstm  # noqa: F401  (registers the BiLSTM with transformers' Auto classes)
from distilbert_cli.errors import UsageError, first_line, unreadable
from distilbert_cli.models.families import find_family

log = logging.getLogger(__name__)

_PATH_PREFIXES = ("/", "./", "../", "~")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_NOT_WEIGHTS = ("training_args.bin",)  # the Trainer's arguments, never loaded as weights
# Files a fast tokenizer is built from: its own JSON, or the vocabulary files of the slow one it converts.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                    "sentencepiece.bpe.model", "spm.model", "tokenizer.model")
_CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # where a checkpoint names the code it ships (auto_map)
_CONVERT = ("convert it to safetensors where you trust the file, e.g. python -c \"import transformers as t; "
            "t.AutoModel.from_pretrained('{path}').save_pretrained('{path}')\" (use the Auto class of its head), "
            "then remove {names}")


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


def _json_object(path: Path) -> dict:
    """A checkpoint's JSON file as an object (check_readable has parsed it)."""
    found = json.loads(path.read_text())
    if not isinstance(found, dict):
        raise unreadable(path, "not a JSON object")
    return found


def refuse_custom_code(where: str, auto_map, role: str, trust_remote_code: bool) -> None:
    """A checkpoint that ships its own code (an `auto_map`) is read only with trust_remote_code=true."""
    if auto_map and not trust_remote_code:
        raise UsageError(f"{role} {where} ships its own model code (auto_map {sorted(auto_map)}), which runs only with "
                         "trust_remote_code=true: pass it if you trust that code")


def check_local_checkpoint(directory: Path, role: str, need: str, trust_remote_code: bool) -> None:
    """What a local folder must hold before transformers reads it (`need`: "config", "tokenizer" or "model"), each
    shortfall one line naming the folder: readable files, no code under trust_remote_code=false, a config with a
    known model_type, safetensors weights (not pickles), tokenizer files."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not directory.is_dir():
        raise UsageError(f"{role} {directory} is a file, not a model folder (one that save_pretrained wrote)")
    check_readable(directory)
    names = {path.name for path in directory.iterdir()}
    for name in _CODE_CONFIGS:
        if name in names:
            refuse_custom_code(f"{directory} ({name})", _json_object(directory / name).get("auto_map"), role,
                               trust_remote_code)
    if need == "tokenizer":
        if not names.intersection(_TOKENIZER_FILES):
            raise UsageError(f"{role} {directory} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES[:4])}, ...):"
                             " save one with the model (tokenizer.save_pretrained)")
        return
    if "config.json" not in names:
        raise UsageError(f"{role} {directory} has no config.json: not a saved model (save_pretrained writes "
                         "config.json and model.safetensors)")
    model_type = _json_object(directory / "config.json").get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{role} {directory}: config.json names no model_type, so no model class can read it")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise UsageError(f"{role} {directory}: config.json has model_type {model_type!r}, which transformers does not "
                         "know (a newer transformers may, or code shipped with the model under trust_remote_code)")
    if need == "model":
        _check_weights(directory, names, role)


def _check_weights(directory: Path, names: set[str], role: str) -> None:
    """Safetensors weights, with every shard an index names; pickled weights alone are refused."""
    if index := sorted(name for name in names if name.endswith(".safetensors.index.json")):
        shards = _json_object(directory / index[0]).get("weight_map")
        if not isinstance(shards, dict):
            raise unreadable(directory / index[0], "it has no weight_map")
        if missing := sorted(set(map(str, shards.values())) - names):
            raise unreadable(directory / missing[0], f"missing: {index[0]} names it")
        return
    if any(name.endswith(".safetensors") for name in names):
        return
    pickled = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES) and name not in _NOT_WEIGHTS)
    if pickled:
        raise UsageError(f"{role} {directory} holds pickled weights ({', '.join(pickled)}), which are not loaded "
                         f"because unpickling can run code: " + _CONVERT.format(path=directory,
                                                                                names=", ".join(pickled)))
    raise UsageError(f"{role} {directory} has no weights (model.safetensors): not a saved model")


def _load(loader, name_or_path: str, role: str, need: str, **kwargs):
    """`loader(name_or_path, **kwargs)` behind the checks a local folder gets first (`check_local_checkpoint`); what
    transformers still refuses (a hub name it cannot fetch, weights that do not fit the config) is one line too."""
    from safetensors import SafetensorError

    check_name_or_path(name_or_path, role)
    trust = kwargs.get("trust_remote_code", False)
    local = Path(name_or_path).expanduser()
    if local.exists():
        check_local_checkpoint(local, role, need, trust)
    try:
        loaded = loader(str(local) if local.exists() else name_or_path, **kwargs)
    except pickle.UnpicklingError as exc:  # a hub checkpoint without safetensors is never unpickled; a last guard
        raise UsageError(f"{role} {name_or_path!r} holds pickled weights, which are not loaded because unpickling "
                         "can run code: " + _CONVERT.format(path=name_or_path, names="the .bin files")) from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
        reason = first_line(exc)
        if "custom code" in reason and not trust:
            reason = "it ships its own model code, which runs only with trust_remote_code=true"
        raise UsageError(f"cannot load {role} from {name_or_path!r}: {reason}") from exc
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info)
    config = model if need == "config" else getattr(model, "config", None)
    if config is not None and not local.exists():  # a hub model of a known type that names its own code anyway
        refuse_custom_code(repr(name_or_path), getattr(config, "auto_map", None), role, trust)
    return loaded


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, role: str = "tokenizer"):
    """The fast tokenizer of a checkpoint (the slow Python tokenizers are the reference's bottleneck)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, name_or_path, role, "tokenizer", use_fast=True,
                      trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise UsageError(f"{role} {name_or_path!r} has no fast (Rust) tokenizer")
    return tokenizer


def load_config(name_or_path: str, trust_remote_code: bool = False, role: str = "model"):
    from transformers import AutoConfig

    return _load(AutoConfig.from_pretrained, name_or_path, role, "config", trust_remote_code=trust_remote_code)


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
        model, info = _load(auto_class.from_pretrained, name_or_path, role, "model",
                            trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True,
                            **kwargs)
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
