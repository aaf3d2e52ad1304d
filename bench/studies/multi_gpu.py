"""The main job on one GPU and on several of one machine (`strategy="offload"`): throughput, memory, scaling.

    python -m bench.studies.multi_gpu run --size 8b --strategy deepspeed --devices 2 --out $OUT [overrides ...]
    python -m bench.studies.multi_gpu report $OUT/multi_gpu.jsonl

`run` starts `python -m lightning_offload.train` (Lightning's launcher starts the other ranks, as for a user) with
micro-batch 4 x 2048 tokens per GPU (the global batch grows with the GPUs: weak scaling) and every decoder layer
checkpointed, samples used memory of every GPU (`nvidia-smi`) and of the host (`MemTotal - MemAvailable`, above
what was used before the start) while it runs, reads each rank's "Final metrics" line, and appends one JSON line.
tokens/s is the sum over ranks (their steps are synchronous). `report` prints the markdown table, with the scaling
efficiency tokens/s(N) / (N x tokens/s(1)) beside each N > 1 row.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

MODELS = {"8b": "llama_8b", "14.8b": "llama_14b", "tiny": "tiny_gpt"}  # tiny: CPU smoke runs
STEPS = 6  # the telemetry drops the first two batches
GIB = 2**30


class MemorySampler(threading.Thread):
    """Peak used memory of every GPU and of the host while the job runs."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.host_baseline = _host_used_bytes()
        self.peak_host = 0
        self.peak_gpu: dict[int, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.peak_host = max(self.peak_host, _host_used_bytes() - self.host_baseline)
            for index, used in _gpu_used_bytes().items():
                self.peak_gpu[index] = max(self.peak_gpu.get(index, 0), used)


def _host_used_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda name: int(fields[name].split()[0])  # noqa: E731
    return (kib("MemTotal") - kib("MemAvailable")) * 1024


def _gpu_used_bytes() -> dict[int, int]:
    try:
        rows = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(i): int(mib) * 2**20 for i, mib in (row.split(",") for row in rows.strip().splitlines())}


def run(args: argparse.Namespace, overrides: list[str]) -> dict:
    cell = f"{args.size}-{args.strategy}-{args.optimizer}-x{args.devices}"
    log_path = args.out / f"{cell}.log"
    # Hydra's own flags (`--config-dir=...`) must precede the overrides, in the ranks the launcher starts too.
    flags = [o for o in overrides if o.startswith("--")]
    overrides = [o for o in overrides if not o.startswith("--")]
    command = [sys.executable, "-m", "lightning_offload.train", *flags, f"hydra.run.dir={args.out / 'runs' / cell}",
               f"model={MODELS[args.size]}", "data=random_tokens", "data.batch_size=4", f"data.seq_len={args.seq_len}",
               f"data.num_batches={STEPS * args.devices}", f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0",
               f"trainer.devices={args.devices}", "trainer.enable_progress_bar=false", "~callbacks.model_checkpoint",
               f"strategy={args.strategy}", f"optimizer={args.optimizer}", "activation_checkpointing=full", *overrides]
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the ranks Lightning's launcher started, too
            except ProcessLookupError:
                pass
    sampler.stopped.set()
    text = log_path.read_text(errors="replace")
    ranks = [ast.literal_eval(m) for m in re.findall(r"Final metrics: (\{.*\})", text)]
    status = "ok" if returncode == 0 and len(ranks) == args.devices else (
        "timeout" if returncode is None else f"failed ({returncode}): {_last_error(text)}")
    result = {
        "size": args.size, "strategy": args.strategy, "optimizer": args.optimizer, "devices": args.devices,
        "overrides": overrides, "status": status, "wall_s": round(time.perf_counter() - started, 1),
        "tokens_per_s": round(sum(r.get("tokens_per_s", 0.0) for r in ranks), 1),
        "step_s": round(max((r.get("step_s_median", 0.0) for r in ranks), default=0.0), 3),
        "model_tflops_per_gpu": round(sum(r.get("model_tflops", 0.0) for r in ranks) / max(len(ranks), 1), 1),
        "peak_gpu_gib": {str(i): round(b / GIB, 1) for i, b in sorted(sampler.peak_gpu.items())},
        "peak_host_gib": round(sampler.peak_host / GIB, 1),
        "peak_rss_per_rank_gib": [round(r.get("peak_host_rss_gib", 0.0), 1) for r in ranks],
    }
    with (args.out / "multi_gpu.jsonl").open("a") as results:
        results.write(json.dumps(result) + "\n")
    print("RESULT " + json.dumps(result), flush=True)
    return result


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if re.search(r"Error|error|Killed|OOM", line)]
    return lines[-1][:200] if lines else "no error line (killed?)"


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    single = {(r["size"], r["strategy"], r["optimizer"]): r["tokens_per_s"]
              for r in rows if r["devices"] == 1 and r["status"] == "ok"}
    lines = ["| size | strategy | optimizer | GPUs | status | s/step | tokens/s | model TFLOP/s per GPU | "
             "peak GPU memory per GPU (GiB) | peak host memory (GiB) | peak RSS per rank (GiB) | scaling efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["size"], r["strategy"], r["optimizer"], r["devices"])):
        base = single.get((r["size"], r["strategy"], r["optimizer"]))
        efficiency = (f"{r['tokens_per_s'] / (r['devices'] * base):.0%}"
                      if base and r["devices"] > 1 and r["status"] == "ok" else "")
        gpus = ", ".join(f"{v}" for v in r["peak_gpu_gib"].values())
        lines.append(f"| {r['size']} | {r['strategy']} | {r['optimizer']} | {r['devices']} | {r['status']} | "
                     f"{r['step_s']} | {r['tokens_per_s']} | {r['model_tflops_per_gpu']} | {gpus} | "
                     f"{r['peak_host_gib']} | {', '.join(map(str, r['peak_rss_per_rank_gib']))} | {efficiency} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cell = commands.add_parser("run")
    cell.add_argument("--size", choices=sorted(MODELS), required=True)
    cell.add_argument("--strategy", required=True, help="a conf/strategy option, e.g. deepspeed or fsdp")
    cell.add_argument("--optimizer", default="user", help="a conf/optimizer option")
    cell.add_argument("--devices", type=int, required=True)
    cell.add_argument("--seq-len", type=int, default=2048)
    cell.add_argument("--timeout-s", type=float, default=540)
    cell.add_argument("--out", type=Path, required=True)
    table = commands.add_parser("report")
    table.add_argument("results", type=Path)
    args, overrides = parser.parse_known_args()
    if args.command == "report":
        print(report(args.results))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run(args, overrides)


if __name__ == "__main__":
    main()
