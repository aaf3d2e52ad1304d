"""Named GPU calls (bench/calls.yaml): the steps one device command runs, each under its own time limit.

    python -m bench call NAME [--dry-run] [--only STEP,...] [--skip STEP,...] [--set KEY=VALUE ...] [-- ARGS]

A call first sources bench/device_setup.sh (`setup: package` or `checkout`) and keeps the environment it exports, so
every step sees the carried wheels and $OUT. Steps run in order; each one's output goes to a log in $OUT and the
lines it names under `show` are printed. A step's time limit is `timeout_s`, or what is left of the call's clock
before `until_s` (the smaller of the two where both are given); a step whose limit comes out below `min_s`, or
that would start later than `skip_after_s` into the call, is skipped.
DeepSpeed's op builds (`build_ops`) never run under a time limit: a build killed mid-way leaves a lock that hangs the
next one.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
CALLS = BENCH / "calls.yaml"
MATRIX = BENCH / "matrix.yaml"
SETUP = "bench/device_setup.sh"
SETUPS = ("package", "checkout", "none")
# What a step is: exactly one of these keys.
KINDS = ("cells", "study", "pytest", "module", "python", "command", "build_ops", "summary", "remove")
STEP_KEYS = {*KINDS, "name", "args", "timeout_s", "until_s", "min_s", "skip_after_s", "log", "show", "show_from",
             "tail", "env", "unset_env", "gpus", "extra_args", "versus"}
CALL_KEYS = {"about", "setup", "params", "env", "libaio_from", "steps"}
# The record fields a `summary` step prints (those present), in this order.
SUMMARY_KEYS = ("cell", "status", "cause", "step_s_median", "step_s_mean", "tokens_per_s", "model_tflops",
                "peak_gpu_torch_gib", "peak_gpu_device_gib", "peak_host_rss_gib", "loss_first", "loss_last", "plan",
                "predicted_step_s", "predicted_gpu_gib", "predicted_host_gib", "error")
# Printed lines are cut here so one step's traceback cannot fill the device command's output.
LINE_CHARS = 1500
# How long a step past its limit has to exit after SIGTERM before it is killed.
KILL_GRACE_S = 10


class CallError(ValueError):
    """A call or subset that bench/calls.yaml or bench/matrix.yaml does not define, or defines wrongly."""


@dataclass(frozen=True)
class Step:
    name: str
    spec: dict[str, Any]

    @property
    def kind(self) -> str:
        return next(key for key in KINDS if key in self.spec)


@dataclass(frozen=True)
class Call:
    name: str
    about: str
    setup: str
    steps: list[Step]
    params: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    libaio_from: str | None = None


def load_subsets(path: Path = MATRIX) -> dict[str, dict[str, Any]]:
    """matrix.yaml's `subsets`: named selections of cells, each a set of `python -m bench run` options."""
    return yaml.safe_load(path.read_text()).get("subsets") or {}


def subset_arguments(name: str, subsets: dict[str, dict[str, Any]]) -> list[str]:
    if name not in subsets:
        raise CallError(f"no subset {name!r} in bench/matrix.yaml `subsets`; defined: {', '.join(sorted(subsets))}")
    arguments = []
    for key, value in subsets[name].items():
        if key == "about":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif isinstance(value, list):
            arguments += [flag, ",".join(str(item) for item in value)]
        else:
            arguments += [flag, str(value)]
    return arguments


def load_calls(path: Path = CALLS) -> dict[str, Call]:
    raw = yaml.safe_load(path.read_text())
    shared_params = {key: str(value) for key, value in (raw.get("params") or {}).items()}
    calls = {}
    for name, spec in raw["calls"].items():
        unknown = set(spec) - CALL_KEYS
        if unknown:
            raise CallError(f"call {name}: unknown keys {sorted(unknown)}; a call has {sorted(CALL_KEYS)}")
        if spec.get("setup", "package") not in SETUPS:
            raise CallError(f"call {name}: setup must be one of {SETUPS}, not {spec['setup']!r}")
        steps = []
        for index, step in enumerate(spec["steps"]):
            step = {key: value for key, value in step.items() if value is not None or key == "cells"}  # null: unset
            kinds = [key for key in KINDS if key in step]
            unknown = set(step) - STEP_KEYS
            if len(kinds) != 1 or unknown:
                raise CallError(f"call {name}, step {index + 1}: one of {KINDS} (found {kinds}), and only "
                                f"{sorted(STEP_KEYS)} (unknown: {sorted(unknown)})")
            if step.get("build_ops") and ("timeout_s" in step or "until_s" in step):
                raise CallError(f"call {name}, step {index + 1}: DeepSpeed's op builds run without a time limit "
                                "(a build killed mid-way leaves a lock that hangs the next one)")
            steps.append(Step(step.get("name") or f"{index + 1}_{kinds[0]}", step))
        names = [step.name for step in steps]
        if len(set(names)) != len(names):
            raise CallError(f"call {name}: step names repeat: {names}")
        calls[name] = Call(name, " ".join(str(spec.get("about", "")).split()), spec.get("setup", "package"), steps,
                           shared_params | {key: str(value) for key, value in (spec.get("params") or {}).items()},
                           {key: str(value) for key, value in (spec.get("env") or {}).items()}, spec.get("libaio_from"))
    return calls


class Substitution:
    """`{OUT}`, `{KEY}` (a call's params; an argument that is exactly `{KEY}` becomes the value's words, none if
    empty) and `{until:N}` (seconds left before N on the call's clock) in a step's arguments."""

    def __init__(self, params: dict[str, str], out: str, elapsed: float) -> None:
        self.values = params | {"OUT": out}
        self.elapsed = elapsed

    def word(self, text: str) -> str:
        def replace(match: re.Match) -> str:
            key = match.group(1)
            if key.startswith("until:"):
                return str(int(float(key.split(":", 1)[1]) - self.elapsed))
            if key not in self.values:
                raise CallError(f"{{{key}}} is not a param of this call (params: {', '.join(sorted(self.values))})")
            return self.values[key]

        return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*|until:[0-9.]+)\}", replace, text)

    def words(self, items: list[Any]) -> list[str]:
        result = []
        for item in items:
            item = str(item)
            whole = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", item)
            if whole and whole.group(1) in self.values:
                result += shlex.split(self.values[whole.group(1)])
            else:
                result.append(self.word(item))
        return result


def step_argv(step: Step, substitution: Substitution, subsets: dict[str, dict[str, Any]], extra: list[str],
              python: str = "python3") -> list[str]:
    """The command a step runs (for `summary` and `remove`, the equivalent command this module runs in-process)."""
    spec = step.spec
    args = substitution.words(spec.get("args") or []) + (extra if spec.get("extra_args") else [])
    kind = step.kind
    if kind == "cells":
        subset = subset_arguments(spec["cells"], subsets) if spec["cells"] else []
        return [python, "-m", "bench", "run", *subset, *args]
    if kind == "study":
        return [python, "-m", f"bench.studies.{spec['study']}", *args]
    if kind == "pytest":
        return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *substitution.words(spec["pytest"]), *args]
    if kind == "module":
        return [python, "-m", spec["module"], *args]
    if kind == "python":
        return [python, "-c", spec["python"], *args]
    if kind == "command":
        return substitution.words(spec["command"]) + args
    if kind == "build_ops":
        return [python, "-m", "bench.calls", "build-ops", *spec["build_ops"]]
    if kind == "summary":
        return [python, "-m", "bench.calls", "summary", substitution.word(spec["summary"]),
                *(["--versus", spec["versus"]] if spec.get("versus") else [])]
    return ["rm", "-rf", *substitution.words(spec["remove"])]


def step_paths(step: Step) -> list[str]:
    """The repository files a step runs (a study's module, a test file, a subset's config), for checking that each
    call's steps resolve."""
    spec, kind = step.spec, step.kind
    if kind == "study":
        return [f"bench/studies/{spec['study']}.py"]
    if kind == "pytest":
        return [item.split("::")[0] for item in map(str, spec["pytest"]) if item.startswith("tests")]
    if kind == "cells":
        return ["bench/matrix.yaml"]
    if kind == "module" and spec["module"].startswith(("bench", "lightning_offload")):
        return [spec["module"].replace(".", "/") + ".py"]
    return []


def device_environment(setup: str) -> dict[str, str]:
    """The environment bench/device_setup.sh exports (it is sourced by bash; its messages go to stderr)."""
    if setup == "none":
        return dict(os.environ) | {"OUT": os.environ.get("OUT", "/tmp/out")}
    done = subprocess.run(["bash", "-c", f'source {SETUP} {setup} >&2 || exit 1; env -0'], capture_output=True)
    sys.stderr.write(done.stderr.decode(errors="replace"))
    if done.returncode != 0:
        raise SystemExit(f"{SETUP} {setup} failed (exit {done.returncode}): are the wheels in .whl/?")
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


def libaio_environment(folder: str, env: dict[str, str]) -> dict[str, str]:
    """Debian's libaio packages (carried in `folder`) unpacked beside the system, not into /: DeepSpeed's async I/O
    op reads CFLAGS/LDFLAGS in its compile check, gcc reads CPATH and LIBRARY_PATH when torch's JIT builds it, and
    the loader finds libaio.so.1 through LD_LIBRARY_PATH."""
    root = "/tmp/libaio"
    os.makedirs(root, exist_ok=True)
    debs = sorted(glob.glob(f"{folder}/*.deb"))
    if not debs:
        raise SystemExit(f"no .deb in {folder}/: fetch them with "
                         f"`mkdir -p {folder} && (cd {folder} && apt-get download libaio1 libaio-dev)` and carry it")
    for deb in debs:
        subprocess.run(["dpkg", "-x", deb, root], check=True)
    include, lib = f"{root}/usr/include", f"{root}/usr/lib/x86_64-linux-gnu"
    loader = lib + (f":{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else "")
    return env | {"CFLAGS": f"-I{include}", "LDFLAGS": f"-L{lib}", "CPATH": include, "LIBRARY_PATH": lib,
                  "LD_LIBRARY_PATH": loader}


def step_limit(step: Step, elapsed: float) -> float | None:
    """The step's time limit in seconds (None: none), from `timeout_s` and what `until_s` leaves."""
    limits = [float(step.spec["timeout_s"])] if "timeout_s" in step.spec else []
    if "until_s" in step.spec:
        limits.append(float(step.spec["until_s"]) - elapsed)
    return min(limits) if limits else None


def show(step: Step, log: Path) -> None:
    """The lines of the step's log it names under `show` (a regular expression; default every line), or its lines
    from the last one `show_from` matches on; the last `tail` of them (default 5)."""
    if not log.exists():
        return
    lines = log.read_text(errors="replace").splitlines()
    if step.spec.get("show_from"):
        starts = [index for index, line in enumerate(lines) if re.search(step.spec["show_from"], line)]
        lines = lines[starts[-1]:][:int(step.spec.get("tail", 5))] if starts else lines
    elif step.spec.get("show"):
        lines = [line for line in lines if re.search(step.spec["show"], line)]
    tail = int(step.spec.get("tail", 5))
    for line in lines[-tail:] if tail else []:
        print("    " + line[:LINE_CHARS], flush=True)


def gpu_count() -> int:
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    except FileNotFoundError:
        return 0
    return len(done.stdout.splitlines()) if done.returncode == 0 else 0


def selected(call: Call, only: list[str], skip: list[str]) -> list[Step]:
    for name in only + skip:
        if name not in {step.name for step in call.steps}:
            raise CallError(f"call {call.name} has no step {name!r}; its steps: "
                            f"{', '.join(step.name for step in call.steps)}")
    return [step for step in call.steps if (not only or step.name in only) and step.name not in skip]


def print_call(call: Call, steps: list[Step], params: dict[str, str], extra: list[str]) -> None:
    """The commands a call would run, as shell lines, with each step's limit as the call starts."""
    subsets, out = load_subsets(), os.environ.get("OUT", "/tmp/out")
    substitution = Substitution(params, out, 0)
    if call.setup != "none":
        print(f"source {SETUP} {call.setup}")
    if call.libaio_from:
        print(f"# libaio unpacked from {call.libaio_from}/*.deb into /tmp/libaio (CFLAGS, LDFLAGS, CPATH, "
              "LIBRARY_PATH, LD_LIBRARY_PATH)")
    for key, value in call.env.items():
        print(f"export {key}={shlex.quote(substitution.word(value))}")
    for step in steps:
        spec, limit = step.spec, step_limit(step, 0)
        conditions = [f"{key} {spec[key]}" for key in ("until_s", "min_s", "skip_after_s", "gpus") if key in spec]
        print(f"# {step.name}" + (f" ({', '.join(conditions)})" if conditions else ""))
        settings = [*(f"-u {key}" for key in spec.get("unset_env") or ()),
                    *(f"{key}={shlex.quote(substitution.word(str(value)))}"
                      for key, value in (spec.get("env") or {}).items())]
        env = f"env {' '.join(settings)} " if settings else ""
        timeout = f"timeout {limit:.0f} " if limit is not None else ""
        log = "" if step.kind in ("summary", "remove") else f" >> {out}/{spec.get('log', step.name + '.log')} 2>&1"
        print(f"{env}{timeout}{shlex.join(step_argv(step, substitution, subsets, extra))}{log}")


def run_call(call: Call, dry_run: bool = False, only: list[str] = (), skip: list[str] = (),
             params: dict[str, str] | None = None, extra: list[str] = ()) -> int:
    """Runs (or, dry, prints) the call's steps; returns the number of steps that failed or were cut by their limit.
    The call's clock (`until_s`, `skip_after_s`) starts once the device is set up."""
    params = call.params | (params or {})
    steps = selected(call, list(only), list(skip))
    if dry_run:
        print_call(call, steps, params, list(extra))
        return 0
    subsets = load_subsets()
    env = device_environment(call.setup)
    out = env.setdefault("OUT", "/tmp/out")
    Path(out).mkdir(parents=True, exist_ok=True)
    if call.libaio_from:
        env = libaio_environment(call.libaio_from, env)
    env |= {key: Substitution(params, out, 0).word(value) for key, value in call.env.items()}
    started = time.monotonic()
    failures = 0
    for step in steps:
        elapsed = time.monotonic() - started
        limit = step_limit(step, elapsed)
        if limit is not None and limit < float(step.spec.get("min_s", 1)):
            print(f"== {step.name}: skipped, {limit:.0f} s left for it", flush=True)
            continue
        if elapsed > float(step.spec.get("skip_after_s", float("inf"))):
            print(f"== {step.name}: skipped, {elapsed:.0f} s into the call", flush=True)
            continue
        if step.spec.get("gpus") and gpu_count() < int(step.spec["gpus"]):
            print(f"== {step.name}: skipped, needs {step.spec['gpus']} GPUs", flush=True)
            continue
        substitution = Substitution(params, out, elapsed)
        if step.kind == "summary":
            print(f"== {step.name}", flush=True)
            print_summary(Path(substitution.word(step.spec["summary"])), step.spec.get("versus"))
            continue
        if step.kind == "remove":
            for pattern in substitution.words(step.spec["remove"]):
                for path in glob.glob(pattern):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            continue
        argv = step_argv(step, substitution, subsets, list(extra), sys.executable)
        step_env = {key: value for key, value in env.items() if key not in (step.spec.get("unset_env") or ())}
        step_env |= {key: substitution.word(str(value)) for key, value in (step.spec.get("env") or {}).items()}
        log = Path(out) / step.spec.get("log", f"{step.name}.log")
        step_started = time.monotonic()
        with open(log, "a") as stream:
            code = run_step(argv, stream, step_env, limit)
        failures += code != 0
        print(f"== {step.name}: exit {code} after {time.monotonic() - step_started:.0f} s "
              f"({time.monotonic() - started:.0f} s into the call)", flush=True)
        show(step, log)
    print(f"took {time.monotonic() - started:.0f} s")
    return failures


def run_step(argv: list[str], stream: Any, env: dict[str, str], limit: float | None) -> int | str:
    """Runs one step in a process group of its own, so a step past its limit is stopped with every process it
    started (a cell's trainer, a notebook's kernel): SIGTERM, then SIGKILL after a grace period."""
    child = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        return child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            try:
                child.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # what the step started and did not stop with it
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return f"timed out at {limit:.0f} s"


def print_summary(path: Path, versus: str | None = None) -> None:
    """One line per record of a results file (its SUMMARY_KEYS); with `versus`, each cell's tokens/s over that
    method's at the same size and regime."""
    if not path.exists():
        print(f"no results in {path}")
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_cell = {record.get("cell"): record for record in records}
    for record in records:
        row = {key: record[key] for key in SUMMARY_KEYS if key in record}
        if versus and record.get("cell"):
            size, _, regime = record["cell"].split("/", 2)
            base = by_cell.get(f"{size}/{versus}/{regime}", {})
            if base.get("tokens_per_s") and record.get("tokens_per_s"):
                row[f"vs_{versus}"] = round(record["tokens_per_s"] / base["tokens_per_s"], 2)
        print(row)


def build_ops(names: list[str]) -> None:
    """Builds DeepSpeed's ops by builder name (e.g. CPUAdamBuilder, AsyncIOBuilder), printing each one's time."""
    from deepspeed.accelerator import get_accelerator

    for name in names:
        builder = get_accelerator().create_op_builder(name)
        print(name, "compatible:", builder.is_compatible(verbose=True), flush=True)
        started = time.time()
        builder.load()
        print(name, f"built in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":  # the in-process steps, run by hand: `python -m bench.calls summary FILE [--versus M]`
    action, *rest = sys.argv[1:]
    if action == "build-ops":
        build_ops(rest)
    elif action == "summary":
        print_summary(Path(rest[0]), rest[2] if rest[1:2] == ["--versus"] else None)
    else:
        raise SystemExit(f"unknown action {action!r}: build-ops NAME... | summary FILE [--versus METHOD]")
