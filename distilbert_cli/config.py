"""Compose a stage's configuration from `conf/` with Hydra's Compose API.

Every command has one primary config (`conf/<command>.yaml`); overrides are passed to Hydra
verbatim, so `distil train +experiment=triple_loss loss.temperature=4` behaves exactly as a Hydra
app would. The composed config is validated once against its schema (distilbert_cli.schema), and the validated,
typed and immutable object is what the stage and the library code it calls read: nothing downstream re-coerces or
re-checks a value. Composition errors and values the schema refuses become `UsageError`s (one line, exit 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from distilbert_cli.errors import UsageError, first_line

if TYPE_CHECKING:
    from pydantic import BaseModel

# Config groups whose options are run-level presets rather than a command's own settings.
PRESET_GROUPS = ("experiment", "debug")
# The top-level keys `distil sweep` composes into its own config; every other override is for its members' stages.
SWEEP_KEYS = ("sweep", "run_dir")
# Keys renamed since earlier releases: old spelling -> current one.
RENAMED_KEYS = {"glue": "task", "glue.tasks": "task.names", "glue.data_dir": "task.data_dir",
                "finetune.max_seq_length": "task.max_seq_length", "eval.max_seq_length": "task.max_seq_length"}

# A wheel carries conf/ inside the package; a source checkout (editable install) keeps it at the top.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf messages span several lines; keep the first line of each cause."""
    parts = []
    while exc is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if first and first != "None" and first not in parts:  # the parser's errors chain a cause printing None
            parts.append(first)
        exc = exc.__cause__ or exc.__context__
    return " ".join(parts) or "invalid configuration"


def override_key(override: str) -> str:
    """The dotted key (or config group) an override sets: `+experiment=no_ce` -> `experiment`."""
    return override.lstrip("+~").split("=")[0]


def quoted(value: str) -> str:
    """`value` as one quoted override value, whatever `=`, commas or quotes it holds (a sweep member's folder)."""
    return "'" + value.replace("'", "\\'") + "'"


def split_overrides(overrides: Sequence[str], top_level_keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """The overrides whose key starts with one of `top_level_keys`, and the others, each in their order."""
    taken = [o for o in overrides if override_key(o).split(".")[0] in top_level_keys]
    return taken, [o for o in overrides if o not in taken]


def expand_sweep(overrides: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """The members of a sweep, with Hydra's own override parser and its sweep syntax (comma lists, `range()`,
    `choice()`, `glob()` over a config group's options): for each member, in the order of the cartesian product,
    (every override, the swept ones), each `key=value`. As Hydra's basic sweeper, a key given twice keeps its last
    value."""
    import itertools

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            parsed = OverridesParser.create(GlobalHydra.instance().config_loader()).parse_overrides(list(overrides))
            choices: dict[str, list[str]] = {}
            swept = set()
            for override in parsed:
                key = override.get_key_element()
                if not override.is_sweep_override():
                    choices[key] = [override.input_line]
                    continue
                if not override.is_discrete_sweep():
                    raise UsageError(f"{override.input_line}: distil sweep enumerates comma lists, range(), choice() "
                                     "and glob(), not interval()")
                choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
                swept.add(key)
                if not choices[key]:
                    raise UsageError(f"{override.input_line}: the sweep gives no value")
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(f"cannot read the sweep's overrides: {one_line(exc)}") from exc
    return [(list(member), [line for key, line in zip(choices, member, strict=True) if key in swept])
            for member in itertools.product(*choices.values())]


def renamed_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Overrides with renamed keys spelled the current way, and a note for each one renamed."""
    current, notes = [], []
    for override in overrides:
        prefix = override[:len(override) - len(override.lstrip("+~"))]
        key, sep, value = override[len(prefix):].partition("=")
        new_key = RENAMED_KEYS.get(key)
        if new_key is None:
            current.append(override)
            continue
        current.append(f"{prefix}{new_key}{sep}{value}")
        notes.append(f"{key} is now {new_key}")
    return current, notes


def compose_unvalidated(command_config: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/<command_config>.yaml` with `overrides` (not validated); raise UsageError on a composition error.

    Presets (`+experiment=`, `+debug=`) describe a whole run: each command keeps the top-level sections of the
    preset that its own config has (random_init's `init` goes to init-student, not to train).
    """
    overrides = list(overrides)
    presets = [o for o in overrides if override_key(o) in PRESET_GROUPS]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=command_config, overrides=overrides)
            if presets:
                own = compose(config_name=command_config, overrides=[o for o in overrides if o not in presets])
                with open_dict(cfg):
                    for key in [key for key in cfg if key not in own]:
                        del cfg[key]
    except OverrideParseException as exc:  # the override grammar's message alone does not say which override
        raise UsageError(f"cannot parse the override {exc.override!r}: {first_line(exc)} (quote a value with "
                         "characters such as [ ] { } , = : in single quotes)") from exc
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(one_line(exc)) from exc
    return cfg


def compose_config(command_config: str, overrides: Sequence[str] = ()) -> BaseModel:
    """The validated config of a command: `conf/<command_config>.yaml` composed with `overrides`, every required
    value set and every value fitting the schema (distilbert_cli.schema), as the command's typed, immutable schema
    object; a UsageError on any user mistake."""
    from distilbert_cli.schema import validated  # imports torch (the loss registries): not for --help

    cfg = compose_unvalidated(command_config, overrides)
    try:
        require_complete_config(cfg)
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve, e.g. key=${missing}
        key = getattr(exc, "full_key", None)
        raise UsageError(f"{key}: {one_line(exc)}" if key else one_line(exc)) from exc
    return validated(command_config, container)


def to_yaml(cfg: BaseModel) -> str:
    """A validated config as YAML, in the order of its schema."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted names of every required (`???`) value still unset."""
    found = []
    for key in cfg:
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            found.append(name)
        elif not OmegaConf.is_interpolation(cfg, key) and isinstance(cfg[key], DictConfig):
            found.extend(missing_keys(cfg[key], f"{name}."))
    return found


def require_complete_config(cfg: DictConfig) -> None:
    if missing := missing_keys(cfg):
        raise UsageError(f"missing required config value(s): {', '.join(missing)} (set them as overrides, "
                         f"e.g. {missing[0]}=...)")
