"""Runs the CPU conformance suite and prints its outcomes as the tables in docs/conformance.md (module kind x backend,
then Trainer feature x backend):

    python -m tests.conformance.table
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.conformance.features import FEATURES
from tests.conformance.modules import LABELS
from tests.conformance.runs import strategies

MODULES = "tests/conformance/test_cpu.py::test_module_trains_as_under_auto_or_is_refused_at_setup"
TRAINER_FEATURES = "tests/conformance/test_trainer_features.py::test_feature_works_as_under_auto_or_is_refused_at_setup"


class OutcomeTable:
    """A pytest plugin that keeps each cell's outcome: what the test recorded, an expected failure's reason, or
    "fails"."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], str] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if "[" not in report.nodeid or not (report.when == "call" or report.skipped or report.failed):
            return
        kind, backend = report.nodeid.split("[", 1)[1].rstrip("]").rsplit("-", 1)
        if hasattr(report, "wasxfail"):
            # The reason's first clause: what differs.
            self.cells[kind, backend] = f"trains; differs: {report.wasxfail.split(':')[0]}"
        elif report.failed:
            self.cells[kind, backend] = "fails"
        elif report.passed:
            self.cells[kind, backend] = dict(report.user_properties).get("outcome", "passes")

    def markdown(self, heading: str, labels: dict[str, str]) -> str:
        backends = list(strategies())
        lines = [f"| {heading} | " + " | ".join(f"`{b}`" for b in backends) + " |",
                 "|---" * (len(backends) + 1) + "|"]
        for row, label in labels.items():
            lines.append(f"| {label} | " + " | ".join(self.cells.get((row, b), "-") for b in backends) + " |")
        return "\n".join(lines)


def main() -> int:
    modules, features = OutcomeTable(), OutcomeTable()
    status = max(pytest.main(["-q", "-p", "no:cacheprovider", suite, *sys.argv[1:]], plugins=[table])
                 for suite, table in ((MODULES, modules), (TRAINER_FEATURES, features)))
    print(modules.markdown("module", LABELS))
    print()
    print(features.markdown("Trainer feature", {name: feature.label for name, feature in FEATURES.items()}))
    return int(status)


if __name__ == "__main__":
    raise SystemExit(main())
