"""What the `stream` backend's initial weights as auto's cost: a benchmark Llama built in host memory (auto) beside
the same build with its parameters on meta and recorded (`parameters_on_meta`), then every record replayed.

    python -m bench.studies.initial_weights --size 1.5b

Prints one `RESULT {json}` line: the parameters, the seconds of each phase (the host build, the recorded build, the
replay in one thread and in `torch.get_num_threads()` threads), and whether every replayed weight and the random
generator after the build are auto's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.models import SIZES, build_llama
from lightning_offload.backends.stream.parameters_on_meta import init_record, parameters_on_meta


def measure(size: str) -> dict[str, object]:
    torch.manual_seed(0)
    start = time.perf_counter()
    auto = build_llama(size)
    auto_seconds = time.perf_counter() - start
    auto_state = torch.get_rng_state()

    torch.manual_seed(0)
    start = time.perf_counter()
    with parameters_on_meta():
        on_meta = build_llama(size)
    recorded_seconds = time.perf_counter() - start
    same_generator = torch.equal(torch.get_rng_state(), auto_state)

    records = [(name, init_record(param)) for name, param in on_meta.named_parameters()]
    start = time.perf_counter()
    same_weights = all(torch.equal(record.value(), auto.get_parameter(name)) for name, record in records)
    replay_seconds = time.perf_counter() - start
    threads = torch.get_num_threads()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda pair: pair[1].value(), records))
    threaded_seconds = time.perf_counter() - start
    return {"size": size, "params": sum(p.numel() for p in auto.parameters()), "auto_build_s": round(auto_seconds, 2),
            "recorded_build_s": round(recorded_seconds, 2), "replay_s": round(replay_seconds, 2),
            "replay_threads": threads, "replay_threaded_s": round(threaded_seconds, 2),
            "same_weights": same_weights, "same_generator": same_generator}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    print("RESULT " + json.dumps(measure(parser.parse_args().size)))


if __name__ == "__main__":
    main()
