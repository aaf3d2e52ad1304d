"""Renders results files into markdown tables (one per regime, beside the probe and the limits) and a PNG plot.

    python -m bench report bench/results.jsonl [more.jsonl ...] --out bench/MATRIX.md   # also bench/MATRIX.png

Records of the same cell from several runs merge: the newest measurement wins, and a cell that a later session did
not get to ("not run") or skipped as answered by another cell's failure keeps its earlier measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path


from bench.limits import COSTS, Cost, attention_key, limit_step, model_matmul_key
from bench.matrix import Superseded, expand, load_config, mark_superseded, memory_failure, time_failure
from bench.methods import BASELINES, OURS
from bench.models import SIZES
from bench.schedule import UNANSWERED

LIMIT_FORMULA = ("limit = max(8 x (params - input embedding) x tokens / matmul rate + attention time "
                 "[+ GPU optimizer time], "
                 "PCIe bytes / measured pinned bandwidth, CPU optimizer time); details in bench/limits.py")
PROBE_FIGURES = {  # probe key -> row label, in the order shown
    "cpus": "CPU cores", "ram_gib": "host memory (GiB)", "disk_free_gib": "free disk (GiB)",
    "h2d_pinned_GBps": "host -> GPU, pinned (GB/s)", "d2h_pinned_GBps": "GPU -> host, pinned (GB/s)",
    "duplex_pinned_GBps": "both ways at once, pinned (GB/s, total)",
    "h2d_pageable_GBps": "host -> GPU, pageable (GB/s)", "d2h_pageable_GBps": "GPU -> host, pageable (GB/s)",
    "host_copy_GBps": "host memory copy, read + write (GB/s)", "bf16_matmul_TFLOPs": "bf16 matmul 8192^3 (TFLOP/s)",
    "cpu_adamw_fused_Gparam_per_s": "CPU torch AdamW fused (Gparam/s)",
    "cpu_adamw_foreach_Gparam_per_s": "CPU torch AdamW foreach (Gparam/s)",
    "cpu_deepspeed_adam_Gparam_per_s": "CPU DeepSpeed CPU Adam (Gparam/s)",
    "deepspeed_adam_build_s": "DeepSpeed CPU Adam JIT build or load (s)",
    "cpu_bnb_adamw8bit_Gparam_per_s": "CPU bitsandbytes AdamW8bit (Gparam/s)",
    "gpu_adamw_fused_fp32_Gparam_per_s": "GPU torch AdamW fused, fp32 (Gparam/s)",
    "gpu_bnb_adamw8bit_Gparam_per_s": "GPU bitsandbytes AdamW8bit, bf16 (Gparam/s)",
    "gpu_fused_adamw8bit_Gparam_per_s": "GPU fused 8-bit AdamW (lightning_offload), bf16 (Gparam/s)",
    "disk_write_GBps": "disk write (GB/s)", "disk_read_GBps": "disk read, page cache dropped (GB/s)",
}


def load(paths: list[Path], superseded: Iterable[Superseded] | None = None) -> tuple[dict | None, dict[str, dict]]:
    """(the probe, one record per cell) over all lines of all files.

    Per cell the newest record wins, except that neither a session which did not get to a cell ("not run"), nor a
    measurement made out of date by a later change to its row (`superseded`, default bench/matrix.yaml's; such a
    record says why under `superseded`), nor a skip inferred from another cell's failure (`run.py
    --skip-known-failures`) ever hides a current measurement. The probe is the figures of every probe that
    succeeded, the newest value of each (a later call may measure figures an earlier one lacked); its `commands`
    are theirs.
    """
    rules = tuple(load_config().superseded if superseded is None else superseded)
    records: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["kind"] == "cell":
                    record = mark_superseded(record, rules)
                records[record.get("cell", record["kind"])].append(record)
    probes = sorted(records.pop("probe", []), key=lambda r: r["finished_at"])
    succeeded = [r for r in probes if r["status"] == "ok"]
    probe = probes[-1] if probes else None
    if succeeded:
        probe = {key: value for record in succeeded for key, value in record.items()}
        probe["commands"] = [record["command"] for record in succeeded]
    cells = {cell: max(runs, key=lambda r: (r["status"] != "not_run", "superseded" not in r,
                                            "inferred_from" not in r, r["finished_at"]))
             for cell, runs in records.items()}
    for cell, record in cells.items():
        source = cells.get(record.get("inferred_from", ""))
        if source is None or "superseded" in record:
            continue
        if "superseded" in source:
            cells[cell] = record | {"superseded": f"inferred from {record['inferred_from']}, itself out of date"}
        elif not (memory_failure(source) or time_failure(source, timeout_s=0)):
            cells[cell] = record | {"superseded": f"inferred from {record['inferred_from']}, which has run since"}
    return probe, cells


def with_unmeasured(cells: dict[str, dict]) -> dict[str, dict]:
    """`cells` and, for every size and regime they cover, the configured matrix's cells they lack, recorded as
    not measured yet: a table never leaves a gap silently."""
    config = load_config()
    sizes = sorted({record["size"] for record in cells.values()}, key=list(SIZES).index)
    regimes = sorted({record["regime"] for record in cells.values()})
    missing = []
    for profile in {record.get("profile") for record in cells.values()}:
        # A smaller machine's table holds the methods measured on it; the whole machine's, the configured matrix.
        methods = sorted({r["method"] for r in cells.values() if r.get("profile") == profile}) if profile else None
        missing += [cell for cell in expand(config, sizes, methods, regimes=regimes, profile=profile)
                    if cell.name not in cells]
    return cells | {cell.name: cell.record("not_measured", "not measured yet") for cell in missing}


def _method_rank(name: str) -> tuple[int, str]:
    baseline_names = [method.name for method in BASELINES]
    return (baseline_names.index(name), "") if name in baseline_names else (len(baseline_names), name)


def _gib(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} GiB"


@functools.cache
def _strategy_checkpoints() -> frozenset[str]:
    """Methods whose module leaves checkpointing to the strategy (the others checkpoint every layer themselves)."""
    return frozenset(name for name, method in load_config().methods.items()
                     if method.options.get("checkpointing") == "by_strategy")


def _recompute_share(plan: str, blocks: int) -> float | None:
    """Share of the model's `blocks` a plan's checkpointing policy recomputes (bench/limits.py
    `Cost.recompute_share`)."""
    policy = re.search(r"checkpointing=(\w+)", plan)
    if policy is None:
        return None
    name = policy.group(1)
    if name.startswith("every_"):
        return 1 / int(name.removeprefix("every_"))
    if name.startswith("first_"):
        return int(name.removeprefix("first_")) / blocks
    return {"full": 1.0, "none": 0.0, "offload": 0.0}.get(name)


@functools.cache
def _backend_costs() -> dict[str, str]:
    """Cost profile name of each of our backends' rows (bench/matrix.yaml), read once per report."""
    prefix = f"{OURS}_"
    return {name.removeprefix(prefix): method.cost for name, method in load_config().methods.items()
            if name.startswith(prefix)}


def plan_cost(record: dict) -> Cost:
    """The cost profile of what the cell ran. Where the planner chose (`backend="auto"`, host_adam's share of the
    optimizer state kept on the GPU, the checkpointing of a module that leaves it to the strategy), the cell's
    `plan` says what it chose: its backend's profile, its recompute share, and for host_adam only the host's share
    of the update and of the copies (the GPU share's update, ~10 ms per billion parameters, is left out)."""
    plan = record.get("plan") or ""
    cost = COSTS[_backend_costs().get(plan.split(" + ")[0], record["cost"])]
    share = _recompute_share(plan, SIZES[record["size"]].layers)
    if record["method"] in _strategy_checkpoints() and share is not None:
        cost = replace(cost, recompute_share=share)
    on_gpu = re.search(r"(\d+) blocks' state on the GPU", plan)
    if plan.startswith("host_adam") and on_gpu:
        shape = SIZES[record["size"]]
        host_share = 1 - int(on_gpu.group(1)) * shape.block_params / shape.params
        cost = replace(cost, updated_share=host_share, d2h_per_step=cost.d2h_per_step * host_share,
                       h2d_per_step=cost.h2d_per_step * host_share)
    return cost


def limit_columns(record: dict, probe: dict | None) -> tuple[str, str]:
    """(limit s/step with the part that sets it, measured/limit), blank where the probe lacks a figure or the cell
    could not run at all."""
    if probe is None or probe.get("status") != "ok" or record["status"] in ("skipped", *UNANSWERED):
        return "", ""
    try:
        limit = limit_step(record["params"], record["matmul_params"], record["micro_batch"] * record["seq"],
                           record["accumulate"], plan_cost(record), probe, size=record["size"])
    except KeyError:  # e.g. DeepSpeed's CPU Adam did not build in the probe, or no GPU
        return "", ""
    current = record["status"] == "ok" and "superseded" not in record
    ratio = f"{record['step_s_median'] / limit.step_s:.2f}x" if current else ""
    return f"{limit.step_s:.2f} ({limit.bound})", ratio


def regime_table(records: list[dict], probe: dict | None) -> list[str]:
    lines = ["| method | size | s/step median | s/step mean | tokens/s | model TFLOP/s | limit s/step | "
             "measured / limit | peak GPU (torch) | peak GPU (device) | peak host RSS | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sizes = list(SIZES)
    for record in sorted(records, key=lambda r: (_method_rank(r["method"]), sizes.index(r["size"]))):
        limit, ratio = limit_columns(record, probe)
        label = record["label"] + (f" ({record['note']})" if record.get("note") else "")
        peaks = [_gib(record.get(key)) for key in ("peak_gpu_torch_gib", "peak_gpu_device_gib", "peak_host_rss_gib")]
        if "superseded" in record:
            was = f"{record['step_s_median']:.3f} s/step" if record["status"] == "ok" else record["cause"]
            figures, peaks, loss = [f"out of date, to be measured again ({record['superseded']}; was: {was})",
                                    "", "", ""], ["", "", ""], ""
        elif record["status"] == "ok":
            figures = [f"{record['step_s_median']:.3f}", f"{record['step_s_mean']:.3f}",
                       f"{record['tokens_per_s']:.0f}", f"{record['model_tflops']:.0f}"]
            loss = f"{record['loss_first']} -> {record['loss_last']}"
        else:
            figures, loss = [record["cause"] or record["status"], "", "", ""], ""
        lines.append("| " + " | ".join([label, record["size"], *figures, limit, ratio, *peaks, loss]) + " |")
    return lines


def coverage(records: list[dict]) -> str:
    """How many cells each kind of record answers, and how many are left to measure."""
    current = [r for r in records if "superseded" not in r]
    inferred = sum("inferred_from" in r for r in current)
    counts = {"measured": sum(r["status"] == "ok" for r in current),
              "failed (each row says how)": sum(r["status"] not in ("ok", "skipped", *UNANSWERED) for r in current),
              f"skipped (each row says why; {inferred} inferred from a measured failure)":
                  sum(r["status"] == "skipped" for r in current),
              "out of date": len(records) - len(current),
              "not measured yet": sum(r["status"] in UNANSWERED for r in current)}
    return f"- Cells: {len(records)}: " + "; ".join(f"{count} {kind}" for kind, count in counts.items() if count) + "."


def _regime_title(record: dict) -> str:
    accumulation = f", accumulate {record['accumulate']}" if record["accumulate"] > 1 else ", no accumulation"
    return (f"{record['regime'].upper()}: {record['tokens_per_step']} tokens per optimizer step "
            f"(micro-batch {record['micro_batch']} x {record['seq']}{accumulation})")


def render_markdown(probe: dict | None, cells: dict[str, dict], plot_name: str | None = None) -> str:
    records = list(cells.values())
    measured = [r for r in records if "device" in r]
    devices = sorted({r["device"] for r in measured} | ({probe["device"]} if probe and "device" in probe else set()))
    versions = sorted({f"{name} {version}" for r in measured for name, version in r.get("versions", {}).items()})
    dates = sorted(r["finished_at"][:10] for r in records if "finished_at" in r)
    lines = ["# Benchmark: single_gpu_offload beside the alternatives and the hardware's limit", "",
             f"- Device: {', '.join(devices) or 'none measured'}",
             f"- Dates: {dates[0]} to {dates[-1]}" if dates else "- Dates: none",
             f"- Versions: {', '.join(versions)}",
             "- Llama-shaped models (random init, untied embeddings), random tokens, checkpointing on every decoder "
             "layer. Step times are over steady steps (the first few left out); model TFLOP/s = "
             "6 x (params - input embedding) x tokens / s.",
             f"- {LIMIT_FORMULA}.", coverage(records), ""]
    if plot_name:
        lines += [f"![tokens/s and peak memory per method and size]({plot_name})", ""]
    profiles = load_config().profiles
    for profile, regime in sorted({(r.get("profile") or "", r["regime"]) for r in records}):
        in_regime = [r for r in records if r["regime"] == regime and (r.get("profile") or "") == profile]
        machine = f", as a {profiles[profile].label}" if profile in profiles else ""
        lines += [f"## {_regime_title(in_regime[0])}{machine}", "", *regime_table(in_regime, probe), ""]
    lines += ["## The machine's ceilings (bench/probe.py)", ""]
    if probe is None or probe.get("status") != "ok":
        lines += [f"No probe result{': ' + probe['cause'] if probe and probe.get('cause') else ''}.", ""]
    else:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {label} | {probe[key]} |" for key, label in PROBE_FIGURES.items() if key in probe]
        lines += [f"| bf16 matmul, the {size} model's own GEMMs at 8192 tokens (TFLOP/s) | {probe[key]} |"
                  for size in SIZES if (key := model_matmul_key(size)) in probe]
        lines += [f"| causal attention of the {size} model, all layers, per micro-batch of 4 x 2048 (ms) | "
                  f"{probe[key]} |" for size in SIZES if (key := attention_key(size)) in probe]
        lines += [f"| {name} | failed: {error} |" for name, error in probe.get("errors", {}).items()]
        lines += [""]
    probe_commands = (probe.get("commands") or [probe["command"]]) if probe else []
    commands = [r["command"] for r in records if "command" in r] + probe_commands
    lines += ["## Commands", "", *sorted({f"    {as_module_command(command)}" for command in commands})]
    return "\n".join(lines) + "\n"


def as_module_command(command: str) -> str:
    """A recorded command as it is typed today: records made before `python -m bench` name the scripts (the matrix's,
    the probe's, a GPU call's)."""
    for script, module in (("python bench/run.py", "python -m bench run"),
                           ("python bench/probe.py", "python -m bench probe")):
        if command == script or command.startswith(script + " "):
            return module + command[len(script):]
    return re.sub(r"bash bench/calls/([\w.]+)\.sh", r"python -m bench call \1", command)


def plot(cells: dict[str, dict], path: Path) -> None:
    """Per regime: tokens/s, and peak GPU (device-wide, solid) and host RSS (dashed), against model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in cells.values() if r["status"] == "ok" and "superseded" not in r]
    regimes = sorted({r["regime"] for r in ok}) or ["r1"]
    # One colour and marker per method in every panel: the alternatives as triangles in Set1's colours, our rows as
    # circles in tab20's, so no two methods share a look (one palette of 20 gave the plain loop and a row of ours
    # one colour).
    ordered = sorted({r["method"] for r in ok}, key=_method_rank)
    theirs = [method for method in ordered if not method.startswith(f"{OURS}_")]
    ours = [method for method in ordered if method.startswith(f"{OURS}_")]
    styles = {method: (plt.get_cmap("Set1")(index % 9), "^") for index, method in enumerate(theirs)}
    styles |= {method: (plt.get_cmap("tab20")(index % 20), "o") for index, method in enumerate(ours)}
    figure, axes = plt.subplots(len(regimes), 2, figsize=(17, 4.5 * len(regimes)), squeeze=False)
    for row, regime in zip(axes, regimes):
        methods = [method for method in styles if any(r["method"] == method for r in ok if r["regime"] == regime)]
        for method in methods:
            points = sorted((r for r in ok if r["regime"] == regime and r["method"] == method),
                            key=lambda r: r["params"])
            billions = [r["params"] / 1e9 for r in points]
            color, marker = styles[method]
            row[0].plot(billions, [r["tokens_per_s"] for r in points], f"{marker}-", color=color, label=method)
            row[1].plot(billions, [r.get("peak_gpu_device_gib") or 0 for r in points], f"{marker}-", color=color)
            row[1].plot(billions, [r.get("peak_host_rss_gib") or 0 for r in points], f"{marker}--", color=color,
                        fillstyle="none")
        row[0].set(title=f"{regime.upper()}: tokens/s", ylabel="tokens/s", yscale="log")
        row[1].set(title=f"{regime.upper()}: peak GPU, device-wide (solid) and host RSS (dashed)", ylabel="GiB")
        sizes = sorted({r["params"] / 1e9 for r in ok})
        for axis in row:
            axis.set(xlabel="parameters (B)", xscale="log")
            axis.set_xticks(sizes, [f"{size:.3g}" for size in sizes])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if methods:  # beside the panels: inside, the legend hides the largest sizes' points
            row[1].legend(*row[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(paths: list[Path], out: Path) -> None:
    probe, cells = load(paths)
    cells = with_unmeasured(cells)
    plot_path: Path | None = out.with_suffix(".png")
    try:
        plot(cells, plot_path)
    except ImportError as error:  # the tables matter more than the picture: never lose them to a missing plotter
        print(f"no plot ({error}); install matplotlib for it", file=sys.stderr)
        plot_path = None
    out.write_text(render_markdown(probe, cells, plot_path.name if plot_path else None))
    print(f"wrote {out}" + (f" and {plot_path}" if plot_path else ""), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("MATRIX.md"))
    args = parser.parse_args()
    write_report(args.results, args.out)


if __name__ == "__main__":
    main()
