"""The cells of a benchmark run: sizes x methods x regimes from bench/matrix.yaml, or the subset asked for."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from bench.methods import OURS, Method, all_methods
from bench.models import SIZES

DEFAULT_CONFIG = Path(__file__).with_name("matrix.yaml")
# Regime fields a command line may override in every selected regime (quick tries, CPU smoke tests).
OVERRIDABLE = ("steps", "warmup", "seq", "micro_batch")


@dataclass(frozen=True)
class Regime:
    name: str
    micro_batch: int
    seq: int
    accumulate: int
    steps: int
    """Optimizer steps run; the first `warmup` of them are left out of the step-time figures."""
    warmup: int

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq * self.accumulate

    @property
    def micro_batches(self) -> int:
        """Micro-batches a run trains, warm-up included: its work at a given model size."""
        return self.steps * self.accumulate


@dataclass(frozen=True)
class Profile:
    """A smaller machine, emulated on the benchmark's by memory budgets (bench/matrix.yaml `profiles`)."""
    name: str
    gpu_memory_gib: float
    """GPU memory the cell may use: torch's allocator is capped at it, and our rows plan within it."""
    host_memory_gib: float
    """Host RAM the cell may use: our rows plan within it, and a cell whose process tree holds more is killed, as
    the machine's (or a job's cgroup) limit would kill it."""
    label: str = ""


@dataclass(frozen=True)
class Superseded:
    """Measurements of a row made before a change to its code: shown as out of date, never as the row's figure."""
    method: str
    before: str
    """ISO time of the change; records of `method` (in `regime`, if named) that finished earlier are out of date."""
    why: str
    regime: str | None = None
    sizes: tuple[str, ...] = ()
    """The sizes the change affects (a plan chosen differently there); empty: every size."""
    profile: str | None = None
    """The smaller machine whose cells the change affects (`profiles`); None: the whole machine's and every
    profile's."""

    def covers(self, record: dict) -> bool:
        return (record.get("method") == self.method and self.regime in (None, record.get("regime"))
                and (not self.sizes or record.get("size") in self.sizes)
                and self.profile in (None, record.get("profile"))
                and _utc(record["finished_at"]) < _utc(self.before))


def _utc(stamp: str) -> datetime:
    """An ISO time; one without a zone (as YAML or an older record may give it) is UTC, as run.py writes them."""
    moment = datetime.fromisoformat(str(stamp))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def mark_superseded(record: dict, rules: Iterable[Superseded]) -> dict:
    """`record`, with `superseded` saying why where a rule makes it out of date."""
    why = next((rule.why for rule in rules if rule.covers(record)), None)
    return record | {"superseded": why} if why else record


@dataclass(frozen=True)
class Config:
    sizes: list[str]
    methods: dict[str, Method]
    """Every method the harness knows, by name; `default_methods` are those a plain `run.py` runs."""
    default_methods: list[str]
    regimes: dict[str, Regime]
    timeout_s: float
    probe_timeout_s: float
    deepspeed_build_s: float
    superseded: tuple[Superseded, ...] = ()
    profiles: dict[str, Profile] = field(default_factory=dict)


def load_config(path: Path = DEFAULT_CONFIG) -> Config:
    raw: dict[str, Any] = yaml.safe_load(Path(path).read_text())
    methods = all_methods(raw.get("single_gpu_offload") or {})
    default_methods = [*raw["methods"], *(name for name in methods if name.startswith(f"{OURS}_"))]
    config = Config(
        sizes=[str(size) for size in raw["sizes"]],
        methods=methods,
        default_methods=default_methods,
        regimes={name: Regime(name=name, **values) for name, values in raw["regimes"].items()},
        timeout_s=float(raw["timeout_s"]),
        probe_timeout_s=float(raw["probe_timeout_s"]),
        deepspeed_build_s=float(raw["deepspeed_build_s"]),
        superseded=tuple(Superseded(**rule | {"before": str(rule["before"]),
                                              "sizes": tuple(str(size) for size in rule.get("sizes") or ())})
                         for rule in raw.get("superseded") or ()),
        profiles={name: Profile(name=name, **values) for name, values in (raw.get("profiles") or {}).items()},
    )
    # Names are checked here, so a typo in the config fails before any cell runs.
    _select("size", config.sizes, list(SIZES))
    _select("method", config.default_methods, list(methods))
    _select("method", [rule.method for rule in config.superseded], list(methods))
    _select("regime", [rule.regime for rule in config.superseded if rule.regime], list(config.regimes))
    _select("size", [size for rule in config.superseded for size in rule.sizes], list(SIZES))
    _select("profile", [rule.profile for rule in config.superseded if rule.profile], list(config.profiles))
    return config


@dataclass(frozen=True)
class PlannedCell:
    size: str
    method: Method
    regime: Regime
    skip: str | None
    """Why the cell cannot run at all (it is recorded as such, never left out of the table)."""
    inferred_from: str | None = None
    """The measured cell whose failure `skip` is inferred from (`skip_known_failures`)."""
    profile: Profile | None = None
    """The smaller machine the cell runs as; None: the whole benchmark machine."""

    @property
    def name(self) -> str:
        return f"{self.size}/{self.method.name}/{self.regime.name}" + (f"@{self.profile.name}" if self.profile else "")

    def record(self, status: str, cause: str | None) -> dict:
        """What every record of this cell says about it, whatever its outcome."""
        shape = SIZES[self.size]
        regime = asdict(self.regime)
        del regime["name"]
        return {"kind": "cell", "cell": self.name, "size": self.size, "method": self.method.name,
                "label": self.method.label, "note": self.method.note, "cost": self.method.cost,
                "regime": self.regime.name, **regime, "tokens_per_step": self.regime.tokens_per_step,
                "params": shape.params, "matmul_params": shape.matmul_params, "status": status, "cause": cause,
                **({"profile": self.profile.name, "profile_gpu_gib": self.profile.gpu_memory_gib,
                    "profile_host_gib": self.profile.host_memory_gib} if self.profile else {})}


def skip_reason(method: Method, regime: Regime, device: str) -> str | None:
    if regime.accumulate > 1 and not method.accumulates:
        return "cannot accumulate gradients (R1 only)"
    if device != "cuda" and not method.runs_on_cpu:
        return "needs CUDA"
    return None


# Statuses that say a method ran out of memory at a size, and how a skipped larger cell names them.
MEMORY_FAILURES = {"gpu_oom": "out of GPU memory", "host_oom": "out of host memory",
                   "killed": "killed by the kernel (host memory)"}
# How bench/run.py marks a timeout that the call's deadline cut but that the planner predicts for the cell's own
# time limit too: a timeout of its method, like one under the full limit.
BEYOND_OWN_LIMIT = "and beyond its own"


def memory_failure(record: dict) -> str | None:
    """How a measured cell failed for memory: an OOM, a kernel kill, or the strategy's planner refusing."""
    if "inferred_from" in record or "superseded" in record:
        return None
    if record["status"] == "error" and (record.get("cause") or "").startswith("PlanDoesNotFit"):
        return "refused by the planner"
    return MEMORY_FAILURES.get(record["status"])


def time_failure(record: dict, timeout_s: float) -> str | None:
    """How a measured cell ran out of a time limit of `timeout_s` or more: killed at it, or stopped at train start
    because the planner predicted its steps overrun it. A cell the call's deadline cut says nothing of its method."""
    if "inferred_from" in record or "superseded" in record or record["status"] != "timeout":
        return None
    cause = record.get("cause") or ""
    if record.get("timeout_s", 0) < timeout_s and BEYOND_OWN_LIMIT not in cause:
        return None
    return "predicted to time out" if cause.startswith("predicted timeout") else "timed out"


def _smallest_first(record: dict) -> tuple[int, int]:
    return SIZES[record["size"]].params, record["accumulate"]


def _micro_batches(record: dict) -> int:
    """`Regime.micro_batches` of the regime a record ran."""
    return record["steps"] * record["accumulate"]


def _implies(failed: dict, cell: PlannedCell, for_time: bool) -> bool:
    """Whether `failed` (a measured record) shows that `cell` cannot run either: the same method, micro-batch and
    sequence, a model at least as large, and at least as many accumulated micro-batches (which only add gradients
    to keep) for a memory failure, at least as many micro-batches in all (more work) for a timeout; never the
    failed cell itself, which is measured again when asked for."""
    regime = cell.regime
    more_work = (_micro_batches(failed) <= regime.micro_batches if for_time
                 else failed["accumulate"] <= regime.accumulate)
    profile = cell.profile.name if cell.profile else None
    return (failed["method"] == cell.method.name and failed["micro_batch"] == regime.micro_batch
            and failed.get("profile") == profile
            and failed["seq"] == regime.seq and more_work
            and SIZES[failed["size"]].params <= SIZES[cell.size].params and failed["cell"] != cell.name)


def _more_work(failed: dict, cell: PlannedCell) -> str:
    """What makes `cell` at least as long as the `failed` cell it is inferred from."""
    more = ["a larger model"] if SIZES[cell.size].params > SIZES[failed["size"]].params else []
    if cell.regime.micro_batches > _micro_batches(failed):
        more.append(f"{cell.regime.micro_batches} micro-batches, not {_micro_batches(failed)}")
    return "needs as much time here" if not more else "needs more time here: " + " and ".join(more)


def skip_known_failures(cells: list[PlannedCell], measured: Iterable[dict], timeout_s: float) -> list[PlannedCell]:
    """`cells` with those that an earlier failure already answers marked to skip, naming it: a memory failure, or a
    timeout under a limit of at least `timeout_s` (the limit these cells would run under)."""
    measured = list(measured)
    memory = sorted((record for record in measured if memory_failure(record)), key=_smallest_first)
    timeouts = sorted((record for record in measured if time_failure(record, timeout_s)), key=_smallest_first)
    marked = []
    for cell in cells:
        if not cell.skip:
            if failed := next((record for record in memory if _implies(record, cell, for_time=False)), None):
                cell = replace(cell, inferred_from=failed["cell"], skip=f"not run: {memory_failure(failed)} at "
                                                                        f"{failed['cell']} (needs more memory here)")
            elif failed := next((record for record in timeouts if _implies(record, cell, for_time=True)), None):
                cell = replace(cell, inferred_from=failed["cell"], skip=f"not run: {time_failure(failed, timeout_s)} "
                                                                        f"at {failed['cell']} ({_more_work(failed, cell)})")
        marked.append(cell)
    return marked


def _select(kind: str, asked: list[str] | None, known: list[str]) -> list[str]:
    unknown = [name for name in asked or [] if name not in known]
    if unknown:
        raise ValueError(f"Unknown {kind}(s) {unknown}; choose from {known}.")
    return list(asked) if asked else known


def parse_list(text: str | None) -> list[str] | None:
    """`"1.5B, 3.6b"` -> `["1.5b", "3.6b"]`; None or empty means "the config's list"."""
    names = [name.strip().lower() for name in (text or "").split(",") if name.strip()]
    return names or None


def expand(config: Config, sizes: list[str] | None = None, methods: list[str] | None = None,
           regimes: list[str] | None = None, device: str = "cuda",
           overrides: dict[str, int] | None = None, profile: str | None = None) -> list[PlannedCell]:
    """The cells to run, ordered regime by regime, then by size, then method (small and fast ones first).

    `overrides` replaces regime fields (e.g. `steps`, `seq`) in every selected regime, for quick tries; `profile`
    names the smaller machine (`Config.profiles`) the cells run as.
    """
    machine = config.profiles[_select("profile", [profile], list(config.profiles))[0]] if profile else None
    sizes = _select("size", sizes or config.sizes, list(SIZES))
    names = _select("method", methods or config.default_methods, list(config.methods))
    chosen = _select("regime", regimes, list(config.regimes))
    cells = []
    for regime_name in chosen:
        regime = replace(config.regimes[regime_name], **(overrides or {}))
        for size in sizes:
            for name in names:
                method = config.methods[name]
                cells.append(PlannedCell(size, method, regime, skip_reason(method, regime, device),
                                         profile=machine))
    return cells


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    for field in OVERRIDABLE:
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the regime's `{field}`")


def overrides_from(args: argparse.Namespace) -> dict[str, int]:
    return {field: getattr(args, field) for field in OVERRIDABLE if getattr(args, field) is not None}


def override_arguments(overrides: dict[str, int]) -> list[str]:
    """`overrides_from`'s inverse, to hand the same overrides to a child process."""
    return [f"--{field.replace('_', '-')}={value}" for field, value in overrides.items()]
