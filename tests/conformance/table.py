"""Runs the CPU conformance suite and prints its outcomes as the table in docs/conformance.md (module kind x backend):

    python -m tests.conformance.table
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.conformance.modules import LABELS
from tests.conformance.runs import strategies

SUITE = "tests/conformance/test_cpu.py::test_module_trains_as_under_auto_or_is_refused_at_setup"


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

    def markdown(self) -> str:
        backends = list(strategies())
        lines = ["| module | " + " | ".join(f"`{b}`" for b in backends) + " |",
                 "|---" * (len(backends) + 1) + "|"]
        for kind, label in LABELS.items():
            lines.append(f"| {label} | " + " | ".join(self.cells.get((kind, b), "-") for b in backends) + " |")
        return "\n".join(lines)


def main() -> int:
    table = OutcomeTable()
    status = pytest.main(["-q", "-p", "no:cacheprovider", SUITE, *sys.argv[1:]], plugins=[table])
    print(table.markdown())
    return int(status)


if __name__ == "__main__":
    raise SystemExit(main())
