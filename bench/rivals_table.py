"""Our rows beside the rivals measured in the same call: tokens/s of each cell and how many times faster our row is.

    python -m bench.rivals_table $OUT/rivals_8b.jsonl --ours single_gpu_offload_gpu_8bit_compiled

One table per size and regime; `--ours` names the row each ratio divides by (the first of the names measured in
that table), and the last line names the best rival and our row's ratio against it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.methods import OURS


def load(paths: list[Path]) -> dict[tuple[str, str], dict[str, dict]]:
    """The newest record of each cell, grouped by (size, regime), methods in the order first measured."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "cell" not in record:  # the probe's record
                continue
            size, method, regime = record["cell"].split("@")[0].split("/")
            groups.setdefault((size, regime), {})[method] = record
    return groups


def table(size: str, regime: str, records: dict[str, dict], ours: list[str]) -> list[str]:
    def tokens_per_s(method: str) -> float | None:
        record = records.get(method, {})
        return record.get("tokens_per_s") if record.get("status") == "ok" else None

    reference = next((name for name in ours if tokens_per_s(name)), None)
    lines = [f"## {size} {regime.upper()}" + (f": ratios are {reference}'s tokens/s over the row's" if reference
                                               else ": none of our rows measured"),
             "| method | status | s/step | tokens/s | ratio | GPU peak (device) GiB | host RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for method, record in records.items():
        rate = tokens_per_s(method)
        ratio = f"{tokens_per_s(reference) / rate:.2f}x" if reference and rate else ""
        shown = record.get("status") if record.get("status") == "ok" else record.get("cause") or record.get("status")
        lines.append(f"| {method} | {str(shown)[:90]} | {record.get('step_s_median', '')} | {rate or ''} | {ratio} "
                     f"| {record.get('peak_gpu_device_gib', '')} | {record.get('peak_host_rss_gib', '')} |")
    rivals = {method: tokens_per_s(method) for method in records if not method.startswith(OURS)}
    measured = {method: rate for method, rate in rivals.items() if rate}
    if reference and measured:
        best = max(measured, key=measured.__getitem__)
        lines.append(f"best rival: {best} ({measured[best]} tokens/s); {reference} "
                     f"{tokens_per_s(reference) / measured[best]:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--ours", required=True, help="comma-separated rows of ours, the first measured is the "
                                                       "reference of each table")
    args = parser.parse_args()
    ours = args.ours.split(",")
    for (size, regime), records in load(args.results).items():
        print("\n".join(table(size, regime, records, ours)) + "\n")


if __name__ == "__main__":
    main()
