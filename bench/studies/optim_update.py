"""Optimizer-update throughput on one GPU: the table of issue #12, every row re-measured in one run.

    python -m bench.studies.optim_update                  # both cases, all rows
    python -m bench.studies.optim_update --cases square   # only 64 x 4096 x 4096

bf16 parameters with bf16 gradients present; Gparam/s = parameters updated per second, the median of `--steps`
optimizer steps after warm-up, each timed with CUDA events. Cases: `square`, 64 tensors of 4096 x 4096 (1.07 B
params), and `llama8b`, the parameter list of Llama 3 8B (hidden 4096, 32 layers, intermediate 14336, 32 heads,
8 KV heads, vocab 128256, untied embeddings: 8.03 B params), built by hand. A row whose library is missing, or
that fails, or that would overrun `--budget-s`, says so instead. The markdown table is printed last and written to
$OUT/optim_update.md when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch


# The least an 8-bit AdamW moves: param read + written and grad read (bf16), both codes read + written, and two
# fp32 scales a block of 256 read + written.
BYTES_PER_PARAM_8BIT = 3 * 2 + 2 * 2 + 2 * 8 / 256


def square_shapes() -> list[tuple[int, ...]]:
    return [(4096, 4096)] * 64


def llama8b_shapes() -> list[tuple[int, ...]]:
    hidden, intermediate, layers, heads, kv_heads, vocab = 4096, 14336, 32, 32, 8, 128256
    kv = hidden // heads * kv_heads
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
             (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),  # gate, up, down
             (hidden,), (hidden,)]  # the two RMSNorm weights
    return [(vocab, hidden)] + layer * layers + [(hidden,), (vocab, hidden)]  # embedding ... final norm, lm_head


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the measured HBM ceiling."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times[2:])


def time_steps(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> tuple[float, float]:
    """(first step's wall time in s, median step time in s)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    optimizer.step()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return first, statistics.median(times)


def ours(stochastic_rounding: bool = True):
    def build(params):
        from lightning_offload.kernels import AdamW8bitFused

        return AdamW8bitFused(params, lr=1e-4, stochastic_rounding=stochastic_rounding)
    return build


def bitsandbytes_adamw8bit(params):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, lr=1e-4)


def torchao(name: str, **kwargs):
    def build(params):
        import torchao.optim

        return getattr(torchao.optim, name)(params, lr=1e-4, **kwargs)
    return build


OPTIMIZERS = {
    "lightning_offload `AdamW8bitFused` (stochastic rounding)": ours(True),
    "lightning_offload `AdamW8bitFused` (round to nearest)": ours(False),
    "bitsandbytes `AdamW8bit`": bitsandbytes_adamw8bit,
    "torch `AdamW(fused=True)`, bf16 state (not 8-bit)": lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    "torchao `AdamW8bit`": torchao("AdamW8bit"),
    "torchao `AdamW8bit(bf16_stochastic_round=True)`": torchao("AdamW8bit", bf16_stochastic_round=True),
    "torchao `AdamW4bit`": torchao("AdamW4bit"),
}


def tile_configs() -> list[tuple[int, int]]:
    return [(2, 2), (4, 4), (8, 4), (8, 8), (16, 8)]


def measure(name: str, build, params, args, deadline: float) -> dict:
    row = {"update": name}
    if time.perf_counter() > deadline:
        return {**row, "note": "skipped: over the time budget"}
    optimizer = None
    try:
        optimizer = build(params)
        first, median = time_steps(optimizer, args.warmup, args.steps)
        if not all(bool(torch.isfinite(p).all()) for p in params[:4]):
            raise RuntimeError("non-finite weights after the steps")
        numel = sum(p.numel() for p in params)
        row.update(gparams=numel / median / 1e9, ms=median * 1e3, first_s=first)
    except ImportError as error:
        row["note"] = f"not installed ({error.name})"
    except Exception as error:  # a failing library must not hide the other rows
        row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    finally:
        del optimizer
        gc.collect()
        torch.cuda.empty_cache()
    return row


def run_case(case: str, args, deadline: float) -> list[dict]:
    shapes = {"square": square_shapes, "llama8b": llama8b_shapes}[case]()
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02)
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=generator, dtype=torch.bfloat16) * 1e-3
    numel = sum(p.numel() for p in params)
    print(f"== {case}: {len(params)} tensors, {numel / 1e9:.2f} B params", flush=True)
    rows = []
    for name, build in OPTIMIZERS.items():
        rows.append({"case": case, **measure(name, build, params, args, deadline)})
        print(json.dumps(rows[-1]), flush=True)
    if case == "square":
        from lightning_offload.kernels import _triton_adamw8bit as kernel

        default = (kernel.BLOCKS_PER_PROGRAM, kernel.NUM_WARPS)
        for blocks, warps in tile_configs():
            kernel.BLOCKS_PER_PROGRAM, kernel.NUM_WARPS = blocks, warps
            name = f"tile sweep: {blocks} x 256 elements, {warps} warps (stochastic rounding)"
            rows.append({"case": case, **measure(name, ours(), params, args, deadline)})
            print(json.dumps(rows[-1]), flush=True)
        kernel.BLOCKS_PER_PROGRAM, kernel.NUM_WARPS = default
    del params
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], bandwidth: float) -> str:
    bnb = {r["case"]: r["gparams"] for r in rows if r["update"].startswith("bitsandbytes") and "gparams" in r}
    lines = ["| case | update | Gparam/s | ms/step | first step (s) | vs bitsandbytes | GB/s at 10.06 B/param |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "gparams" not in r:
            lines.append(f"| {r['case']} | {r['update']} | {r['note']} | | | | |")
            continue
        ratio = f"{r['gparams'] / bnb[r['case']]:.2f}x" if r["case"] in bnb else ""
        ours_row = "AdamW8bitFused" in r["update"] or r["update"].startswith("tile")
        effective = f"{r['gparams'] * BYTES_PER_PARAM_8BIT:.0f}" if ours_row else ""
        lines.append(f"| {r['case']} | {r['update']} | {r['gparams']:.1f} | {r['ms']:.2f} | {r['first_s']:.2f} "
                     f"| {ratio} | {effective} |")
    bound = bandwidth / BYTES_PER_PARAM_8BIT / 1e9
    lines.append(f"| | HBM bound for an 8-bit update ({BYTES_PER_PARAM_8BIT:.2f} B/param at the measured "
                 f"{bandwidth / 1e12:.2f} TB/s copy rate) | {bound:.0f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="square,llama8b")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=330.0, help="rows that would start later are skipped")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64  # torchao compiles its step once per parameter shape

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = [row for case in args.cases.split(",") for row in run_case(case, args, deadline)]
    table = markdown(rows, bandwidth)
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "optim_update.md").write_text(table + "\n")
        Path(os.environ["OUT"], "optim_update.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
