"""The machine's ceilings that bound a training step, printed as `RESULT {json}` (bench/run.py --probe records it).

PCIe both ways (pinned and pageable) and both at once, host memory bandwidth, the bf16 matmul rate (8192^3 and each
model's own GEMMs), each model's attention time, optimizer update
rates on the CPU (torch fused and foreach AdamW, DeepSpeed CPU Adam, bitsandbytes 8-bit) and on the GPU (torch
fused AdamW on fp32, bitsandbytes 8-bit on bf16), and disk bandwidth. bench/limits.py turns them into limit step
times. Each measurement that fails is reported under `errors` and the others still run.

    python -m bench probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable


import torch

from bench import GIB, RESULT_PREFIX
from bench.limits import (CPU_ADAMW_FOREACH, CPU_ADAMW_FUSED, CPU_DEEPSPEED_ADAM, D2H, DUPLEX, GPU_ADAMW_FUSED,
                          GPU_BNB_ADAMW8BIT, GPU_FUSED_ADAMW8BIT, H2D, MATMUL, attention_key,
                          model_matmul_key)
from bench.measure import device_name, versions
from bench.models import SIZES

Figures = dict[str, float]


def _seconds(work: Callable[[], object], repeats: int, synchronize: bool) -> float:
    """Mean seconds of `work` after one untimed warm-up call."""
    work()
    if synchronize:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    if synchronize:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def pcie(gib: float) -> Figures:
    n = int(gib * GIB) // 2
    pinned = torch.empty(n, dtype=torch.bfloat16).pin_memory()
    pageable = torch.empty(n, dtype=torch.bfloat16)
    device = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    for tensor in (pinned, pageable, device):
        tensor.normal_()
    nbytes = 2 * n

    def rate(dst: torch.Tensor, src: torch.Tensor, repeats: int) -> float:
        return round(nbytes / _seconds(lambda: dst.copy_(src, non_blocking=True), repeats, True) / 1e9, 1)

    figures = {H2D: rate(device, pinned, 5), D2H: rate(pinned, device, 5),
               "h2d_pageable_GBps": rate(device, pageable, 2), "d2h_pageable_GBps": rate(pageable, device, 2)}
    # Both directions at once, one copy engine each, on two side streams.
    pinned_back, device_in = torch.empty_like(pinned).pin_memory(), torch.empty_like(device)
    upload, download = torch.cuda.Stream(), torch.cuda.Stream()

    def both_ways() -> None:
        with torch.cuda.stream(upload):
            device_in.copy_(pinned, non_blocking=True)
        with torch.cuda.stream(download):
            pinned_back.copy_(device, non_blocking=True)

    figures[DUPLEX] = round(2 * nbytes / _seconds(both_ways, 3, True) / 1e9, 1)
    return figures


def host_memory(gib: float) -> Figures:
    source = torch.empty(int(gib * GIB) // 4)
    source.normal_()
    target = torch.empty_like(source)
    # A copy reads and writes every byte once.
    return {"host_copy_GBps": round(2 * 4 * source.numel() / _seconds(lambda: target.copy_(source), 2, False) / 1e9, 1)}


def matmul() -> Figures:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return {MATMUL: round(2 * 8192**3 / _seconds(lambda: a @ b, 20, True) / 1e12)}


def gemm_seconds(weights: list[tuple[int, int]], tokens: int) -> tuple[float, float]:
    """(FLOPs, seconds) of the GEMMs of `tokens` rows through each (out, in) weight as a checkpointed step runs
    them: the forward twice (with its recompute), the input gradient and the weight gradient."""
    flops = seconds = 0.0
    for out_features, in_features in weights:
        x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(tokens, out_features, dtype=torch.bfloat16, device="cuda")
        seconds += (2 * _seconds(lambda: x @ w.t(), 10, True) + _seconds(lambda: dy @ w, 10, True)
                    + _seconds(lambda: dy.t() @ x, 10, True))
        flops += 4 * 2 * tokens * in_features * out_features
        del x, w, dy
    return flops, seconds


def model_matmuls(tokens: int = 8192) -> Figures:
    """Per benchmark size, the bf16 rate of that model's own GEMMs: a block's seven (weighted by the layer count)
    and the output layer's, at `tokens` rows. Shapes narrower than 8192^3 (the KV projections, a 1.5B model's
    2048-wide layers) run slower, and the limit should not charge a method for that."""
    figures = {}
    for size, shape in SIZES.items():
        if size == "tiny":
            continue
        block_flops, block_s = gemm_seconds(shape.block_weights, tokens)
        head_flops, head_s = gemm_seconds([(shape.vocab, shape.hidden)], tokens)
        rate = (shape.layers * block_flops + head_flops) / (shape.layers * block_s + head_s)
        figures[model_matmul_key(size)] = round(rate / 1e12)
        torch.cuda.empty_cache()
    return figures


def attention_seconds(size: str, backend: str, micro_batch: int = 4, seq: int = 2048) -> float | None:
    """Seconds of one layer's causal SDPA (all heads) as a checkpointed step runs it: forward, its recompute and
    backward; None where `backend` ("flash" or "cudnn") cannot run the shape on this GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    shape = SIZES[size]
    q, k, v = (torch.randn(micro_batch, shape.heads, seq, shape.hidden // shape.heads, dtype=torch.bfloat16,
                           device="cuda", requires_grad=True) for _ in range(3))

    def step() -> None:
        with torch.no_grad():
            sdpa(q, k, v, is_causal=True)
        out = sdpa(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    try:
        with sdpa_kernel(kernel):
            return _seconds(step, 10, True)
    except RuntimeError:  # "No available kernel" for this GPU or shape
        return None


def model_attention() -> Figures:
    """Per benchmark size, its attention time per micro-batch of 4 x 2048 tokens over all layers (ms), at the faster
    of the flash and cuDNN kernels: compute every step runs besides the GEMMs (bench/limits.py adds it)."""
    figures = {}
    for size, shape in SIZES.items():
        if size == "tiny":
            continue
        timed = [s for s in (attention_seconds(size, "flash"), attention_seconds(size, "cudnn")) if s is not None]
        if timed:
            figures[attention_key(size)] = round(shape.layers * min(timed) * 1e3, 1)
        torch.cuda.empty_cache()
    return figures


def _update_rate(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], repeats: int) -> float:
    """Gparam/s of `optimizer.step()`; the warm-up step creates the state."""
    on_gpu = params[0].is_cuda
    # Three significant digits: a slow or busy host's rate must not round to zero.
    return float(f"{sum(p.numel() for p in params) / _seconds(optimizer.step, repeats, on_gpu) / 1e9:.3g}")


def _cpu_param(mparams: float) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.randn(int(mparams * 1e6)))
    param.grad = torch.randn_like(param)
    return param


def cpu_torch_adamw(mparams: float) -> Figures:
    param = _cpu_param(mparams)
    return {CPU_ADAMW_FUSED: _update_rate(torch.optim.AdamW([param], lr=1e-4, fused=True), [param], 2),
            CPU_ADAMW_FOREACH: _update_rate(torch.optim.AdamW([param], lr=1e-4, foreach=True), [param], 2)}


def cpu_deepspeed_adam(mparams: float) -> Figures:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param = _cpu_param(mparams)
    started = time.perf_counter()
    optimizer = DeepSpeedCPUAdam([param], lr=1e-4)  # the first one on a machine JIT-builds the extension
    build_s = round(time.perf_counter() - started, 1)
    return {"deepspeed_adam_build_s": build_s, CPU_DEEPSPEED_ADAM: _update_rate(optimizer, [param], 2)}


def cpu_bnb_8bit(mparams: float) -> Figures:
    import bitsandbytes as bnb

    param = _cpu_param(mparams)
    return {"cpu_bnb_adamw8bit_Gparam_per_s": _update_rate(bnb.optim.AdamW8bit([param], lr=1e-4), [param], 2)}


def gpu_optimizers(tensors: int) -> Figures:
    """Update rates of the GPU-resident optimizers of the plain loop (fp32) and torchtune's method (bf16, 8-bit)."""
    import bitsandbytes as bnb

    from lightning_offload.kernels import AdamW8bitFused

    figures = {}
    for key, dtype, make in [
        (GPU_ADAMW_FUSED, torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        (GPU_BNB_ADAMW8BIT, torch.bfloat16, lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)),
        (GPU_FUSED_ADAMW8BIT, torch.bfloat16, lambda ps: AdamW8bitFused(ps, lr=1e-4)),
    ]:
        params = [torch.nn.Parameter(torch.randn(4096, 4096, device="cuda", dtype=dtype)) for _ in range(tensors)]
        for param in params:
            param.grad = torch.randn_like(param)
        figures[key] = _update_rate(make(params), params, 5)
        del params
        torch.cuda.empty_cache()
    return figures


def disk(gib: float, directory: str) -> Figures:
    chunk = os.urandom(64 * 2**20)
    chunks = max(1, int(gib * GIB) // len(chunk))
    fd, path = tempfile.mkstemp(dir=directory, prefix="probe-")
    try:
        started = time.perf_counter()
        for _ in range(chunks):
            os.write(fd, chunk)
        os.fsync(fd)
        write_s = time.perf_counter() - started
        # Drop the file's pages from the page cache, so the read comes from the disk.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        buffer = bytearray(len(chunk))
        started = time.perf_counter()
        while os.readv(fd, [buffer]):
            pass
        read_s = time.perf_counter() - started
    finally:
        os.close(fd)
        os.unlink(path)
    nbytes = chunks * len(chunk)
    return {"disk_write_GBps": round(nbytes / write_s / 1e9, 2), "disk_read_GBps": round(nbytes / read_s / 1e9, 2)}


def machine(directory: str) -> dict:
    statvfs = os.statvfs(directory)
    cuda = torch.cuda.is_available()
    return {"device": device_name(torch.device("cuda" if cuda else "cpu")), "cpus": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "disk_free_gib": round(statvfs.f_bavail * statvfs.f_frsize / GIB, 1), "versions": versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of each PCIe and host-memory copy")
    parser.add_argument("--adam-mparams", type=float, default=268.4, help="parameters of the CPU optimizer runs")
    parser.add_argument("--gpu-adam-tensors", type=int, default=64, help="4096x4096 tensors of the GPU optimizer runs")
    parser.add_argument("--disk-gib", type=float, default=2.0)
    parser.add_argument("--disk-dir", default=tempfile.gettempdir())
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's CPU Adam (and its JIT build)")
    parser.add_argument("--only", help="comma-separated measurements to run, e.g. model_matmuls,model_attention "
                                       "(a later record's figures join an earlier full probe's in the report)")
    args = parser.parse_args()
    result = {"ok": True, **machine(args.disk_dir), "errors": {}}
    measurements: dict[str, Callable[[], Figures]] = {
        "host_memory": lambda: host_memory(2 * args.copy_gib),
        "cpu_torch_adamw": lambda: cpu_torch_adamw(args.adam_mparams),
        "cpu_bnb_8bit": lambda: cpu_bnb_8bit(args.adam_mparams),
        "disk": lambda: disk(args.disk_gib, args.disk_dir),
    }
    if not args.no_deepspeed:
        measurements["cpu_deepspeed_adam"] = lambda: cpu_deepspeed_adam(args.adam_mparams)
    if torch.cuda.is_available():
        measurements |= {"pcie": lambda: pcie(args.copy_gib), "matmul": matmul, "model_matmuls": model_matmuls,
                         "model_attention": model_attention,
                         "gpu_optimizers": lambda: gpu_optimizers(args.gpu_adam_tensors)}
    else:
        result["errors"]["gpu"] = "needs CUDA"
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(measurements))
        if unknown:
            parser.error(f"unknown measurement(s) {unknown}; choose from {sorted(measurements)}")
        measurements = {name: measurements[name] for name in wanted}
    for name, measure in measurements.items():
        try:
            result |= measure()
        except Exception as error:  # one failing measurement must not hide the others
            result["errors"][name] = f"{type(error).__name__}: {str(error)[:300]}"
        print(f"probe: {name} done", file=sys.stderr, flush=True)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
