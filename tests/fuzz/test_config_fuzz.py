"""Every key of every command's config, set to generated wrong-typed and out-of-range values (or removed), through the
real CLI composition (`distil <command> key=value --cfg`): exit 0 with the validated config, or exit 2 with one
`error:` line naming the key; never a traceback."""

from __future__ import annotations

import pytest
from faults.harness import distil
from fuzz.strategies import CONFIG_VALUES, TEXT, budget, hydra_value, one_error_line, seeded_by
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import DictConfig

from distilbert_cli.cli import COMMANDS
from distilbert_cli.config import compose_unvalidated

pytestmark = pytest.mark.fuzz


def leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        node = cfg._get_node(key)
        keys += leaf_keys(node, f"{prefix}{key}.") if isinstance(node, DictConfig) else [f"{prefix}{key}"]
    return keys


COMMAND_KEYS = [(spec.name, key) for spec in COMMANDS for key in leaf_keys(compose_unvalidated(spec.config))]
OVERRIDES = st.one_of(
    CONFIG_VALUES.map(lambda value: ("set", hydra_value(value))),
    TEXT.map(lambda text: ("set", text)),  # as typed, unquoted: the override grammar's own errors
    st.just(("remove", "")),
)


def test_every_command_has_keys():
    assert {name for name, _ in COMMAND_KEYS} == {spec.name for spec in COMMANDS} and len(COMMAND_KEYS) > 200


@pytest.mark.parametrize(("command", "key"), COMMAND_KEYS, ids=[f"{c}:{k}" for c, k in COMMAND_KEYS])
def test_a_wrong_value_of_any_key_is_one_line_naming_it(tmp_path_factory, command, key):
    run_dir = tmp_path_factory.getbasetemp() / "fuzz-run"

    @seeded_by(f"{command}:{key}")
    @budget("keys")
    @given(override=OVERRIDES)
    def composed(override):
        action, value = override
        argument = f"~{key}" if action == "remove" else f"{key}={value}"
        result = distil(command, f"run_dir={run_dir}", argument, "--cfg")
        if result.exit_code == 0:
            assert result.output.strip(), result.output
            return
        line = one_error_line(result)
        assert key.rsplit(".", 1)[-1] in line, line

    composed()
