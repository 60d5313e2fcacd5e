"""The README documents what the code does: every setting with its default, every metric, every CLI command."""
from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

import service.metrics
from cli import build_parser
from service.settings import Settings
from bench.harness import ROOT

README = (ROOT / "README.md").read_text()


def _table_row(name: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"README has {len(rows)} table rows for {name}"
    return rows[0]


def test_every_setting_is_in_the_configuration_table_with_its_default() -> None:
    for name, field in Settings.model_fields.items():
        row = _table_row(f"HOLOREC_{name.upper()}")
        default = field.default
        shown = row.split("|")[2].strip().strip("`")
        if default is None:
            assert shown == "unset", row
        else:
            assert shown == str(default).lower() if isinstance(default, bool) else shown == str(default), (row, default)


def test_every_metric_is_listed() -> None:
    for m in vars(service.metrics).values():
        if isinstance(m, MetricWrapperBase):
            _table_row(m._name + ("_total" if m._type == "counter" else ""))  # counters are exported with _total


def test_cli_commands_in_the_readme_exist() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    used = set(re.findall(r"(?:^|`|=\S+ )holorec (\w+)", README, flags=re.MULTILINE))  # commands typed, not prose
    assert used and used <= commands, used - commands
