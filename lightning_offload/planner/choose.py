"""Choosing a plan: enumerate candidates for the levers the user left open, keep those that fit, take the fastest.

The user's optimizer arithmetic is kept whenever a plan that keeps it fits: 8-bit optimizer state is a different
optimizer, chosen automatically only when nothing exact fits (with a warning) or when the user asked for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_offload.backends import registry
from lightning_offload.losses import slice_workspace_bytes
from lightning_offload.planner.budget import GIB
from lightning_offload.planner.cost import Ceilings, estimate_step_time
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.memory import Machine, MemoryEstimate, estimate_memory, shortfalls
from lightning_offload.planner.terms import CandidateLevers, Plan, StepTime, compute_weights

if TYPE_CHECKING:
    from lightning_offload.backends.needs import RunNeeds
    from lightning_offload.backends.spec import BackendSpec
    from lightning_offload.planner.disk import Disk

# Fraction of each memory tier a plan may fill: allocator fragmentation, the data loader, other processes.
SAFETY_MARGIN = 0.9
# Step times this close (a ratio) rank as one, the tie going to the plan with less memory: plans the cost model
# cannot tell apart (the same compute, transfers hidden under it). A ratio, not 0.01 s: that tied a small model's
# plans 8% apart.
TIE = 1.001
POLICIES = ("none", "first_n", "every_k", "full", "offload")
# A plan whose disk traffic would make its step more than this many times its compute time is refused, unless the
# user pinned the disk (`offload_device="nvme"`).
DISK_BOUND_FACTOR = 2.0

class PlanDoesNotFit(ValueError):
    """No candidate plan fits the machine; the message names each tier's shortfall and what would fit."""


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    memory: MemoryEstimate
    step_time: StepTime
    shortfalls: dict[str, float]
    refused: str = ""
    """Why a plan that fits memory is not taken (disk traffic that would dominate its step); empty: it is not."""

    @property
    def fits(self) -> bool:
        return not self.shortfalls and not self.refused

    @property
    def step_time_s(self) -> float:
        return self.step_time.total


@dataclass(frozen=True)
class PlanReport:
    """What was considered and what won; `chosen` is None when nothing fits (then `error()` explains)."""

    stats: ModelStats
    machine: Machine
    ceilings: Ceilings
    candidates: list[Candidate]
    chosen: Candidate | None
    reason: str
    accumulate: int = 1
    world_size: int = 1
    ranks_per_host: int | None = None
    holds_gradients: bool = False
    plans: tuple[Plan, ...] = ()
    """The candidate plans as asked, before `choose` sized their blocks on the GPU: what a re-plan for another
    batch (the refusal's hints) starts from."""
    disk: Disk | None = None
    """The disk the user gave for state (`nvme_path`), probed; None: no plan keeps state on disk."""
    disk_pinned: bool = False
    needs: RunNeeds | None = None
    """What the run asks of an engine (`RunNeeds`); None: nothing beyond the model."""
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)
    """Backends left out because they cannot run what the run needs (`cannot_run`), with why."""
    clipping: str | None = None
    """How the run clips its gradients ("norm", "value"); None: it does not."""
    margin: float = SAFETY_MARGIN
    """The fraction of each memory tier a plan could fill (less where the model's memory is estimated, not measured)."""

    def tokens_per_second(self, candidate: Candidate) -> float:
        return self.accumulate * self.stats.tokens / candidate.step_time_s if candidate.step_time_s else 0.0

    def rows(self) -> list[dict[str, object]]:
        """One dict per candidate (for tables and plots): the chosen one, then the fastest that fit."""
        candidates = ordered(self.candidates)
        if self.chosen is not None:
            candidates = [self.chosen] + [c for c in candidates if c is not self.chosen]
        return [{
            "plan": str(c.plan), "backend": c.plan.backend, "optimizer": c.plan.optimizer,
            "checkpointing": c.plan.checkpointing, "fits": c.fits, "chosen": c is self.chosen,
            "step_time_s": c.step_time_s, "gpu_gib": c.memory.gpu_bytes / GIB, "host_gib": c.memory.host_bytes / GIB,
            "pinned_gib": c.memory.pinned_bytes / GIB, "disk_gib": c.memory.disk_bytes / GIB,
            "disk_written_gb_per_step": c.step_time.disk_write_bytes / 1e9,
            "short": ", ".join(f"{tier} {gib:.1f} GiB" for tier, gib in c.shortfalls.items()),
            "refused": c.refused,
        } for c in candidates]

    def table(self, limit: int = 12) -> str:
        # The disk columns only when a disk was given: bytes written wear an SSD out (its TBW rating).
        on_disk = self.disk is not None
        header = f"{'':2}{'plan':66} {'s/step':>7} {'GPU GiB':>8} {'host GiB':>9}"
        header += f" {'disk GiB':>9} {'written GB/step = TB/1k steps':>29}" if on_disk else ""
        where = f"{self.machine.describe()}" + (f", disk {self.disk.describe()}" if on_disk else "")
        lines = [f"Plans for {parameter_count(self.stats.parameters)} parameters on {where} "
                 f"({self.ceilings.device}):", header + "  fits"]
        for row in self.rows()[:limit]:
            mark = "->" if row["chosen"] else ""
            fits = "yes" if row["fits"] else f"no: {row['refused'] or row['short'] + ' short'}"
            disk = f" {row['disk_gib']:9.1f} {row['disk_written_gb_per_step']:29.1f}" if on_disk else ""
            lines.append(f"{mark:2}{row['plan']:66} {row['step_time_s']:7.3g} {row['gpu_gib']:8.1f} "
                         f"{row['host_gib']:9.1f}{disk}  {fits}")
        if len(self.candidates) > limit:
            lines.append(f"  ... {len(self.candidates) - limit} more")
        if self.left_out:
            lines.append(self.left_out_note)
        lines.append(self.reason)
        return "\n".join(lines)

    @property
    def left_out_note(self) -> str:
        """The backends left out and why, in one line; empty when none was."""
        if not self.left_out:
            return ""
        return "Left out: " + "; ".join(f"`{name}`: {why}" for name, why in self.left_out.items()) + "."

    def error(self) -> PlanDoesNotFit:
        return _refusal(self)


def parameter_count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.2f}M"


def ordered(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Those that fit first, fastest first. A plan within `TIE` of the fastest of its group ties with it, and a tie
    goes to the lesser host memory (slow to pin, shared with everything else), then GPU memory."""
    groups: list[list[Candidate]] = []
    for candidate in sorted(candidates, key=lambda c: (not c.fits, c.step_time_s)):
        first = groups[-1][0] if groups else None
        if first is not None and first.fits == candidate.fits and candidate.step_time_s <= TIE * first.step_time_s:
            groups[-1].append(candidate)
        else:
            groups.append([candidate])
    return [c for group in groups for c in sorted(group, key=lambda c: (c.memory.host_bytes, c.memory.gpu_bytes))]


def candidate_plans(stats: ModelStats, *, backends: Sequence[str], on_cuda: bool, optimizer: str | None = None,
                    checkpointing: str | None = None, every_k: int | None = None, first_n: int | None = None,
                    adamw_compatible: bool = True, gpu_state_blocks: int | None = None,
                    accumulate: int = 1, offload_device: str | None = None, nvme_state: str | None = None,
                    disk_given: bool = False, disk_blocks: int | None = None,
                    needs: RunNeeds | None = None) -> list[Plan]:
    """Every plan over the levers the user left open (`None`); pinned levers are taken as given. Each backend's spec
    sets its own levers on them (`plan_variants`): `host_adam` candidates keep `gpu_state_blocks` (None: `choose`
    sizes it to the most that fit); `fsdp` ones, when `accumulate` > 1, come with the micro-batches' gradients added
    up on the GPU or in host memory; `deepspeed`
    ones keep state on disk only where the user gave one (`disk_given`: never written to uninvited), and so do
    `stream` ones (`disk_blocks` of them; None: `choose` sizes it to the fewest that fit). A backend that cannot run
    what the run `needs` has none. `first_n` plans checkpoint that many blocks (None: `choose` sizes it to the fewest
    that fit)."""
    if checkpointing == "first_n" and first_n is not None and not 0 <= first_n <= stats.blocks:
        raise ValueError(f"`first_n={first_n}` blocks to checkpoint, but the model has {stats.blocks}. Pass at most "
                         f"{stats.blocks}, or `activation_checkpointing='full'`.")
    # Checkpointing works block by block: a model without repeated blocks has only `none` to choose.
    policies = [checkpointing] if checkpointing else list(POLICIES) if stats.blocks else ["none"]
    levers = CandidateLevers(gpu_state_blocks, accumulate, offload_device, nvme_state, disk_given, disk_blocks)
    plans = []
    for backend in backends:
        spec = registry.spec(backend)
        if spec.needs_cuda and not on_cuda and len(backends) > 1 or spec.own_adamw and not adamw_compatible:
            continue
        if needs is not None and cannot_run(backend, needs) is not None:
            continue
        for name in _optimizers_for(spec, optimizer):
            for policy in policies:
                if spec.policies is not None and policy not in spec.policies:
                    continue
                for k in ([every_k] if every_k else [2, 4]) if policy == "every_k" else [2]:
                    base = Plan(backend=backend, optimizer=name, checkpointing=policy, every_k=k,
                                first_n=first_n if policy == "first_n" else None)
                    plans += spec.plan_variants(base, stats, levers)
    return plans


def exclusions(stats: ModelStats, *, backends: Sequence[str], on_cuda: bool, optimizer: str | None = None,
               checkpointing: str | None = None, adamw_compatible: bool = True,
               needs: RunNeeds | None = None) -> dict[str, str]:
    """Why each of `backends` has no candidate plan under the pinned levers (`candidate_plans`' rules, in words)."""
    reasons = {}
    for backend in backends:
        spec = registry.spec(backend)
        if spec.needs_cuda and not on_cuda and len(backends) > 1:
            reasons[backend] = "it needs a CUDA GPU"
        elif spec.own_adamw and not adamw_compatible:
            reasons[backend] = ("it updates with AdamW inside backward, and `configure_optimizers` returns another "
                                "optimizer (return `torch.optim.AdamW`)")
        elif needs is not None and (reason := cannot_run(backend, needs)) is not None:
            reasons[backend] = reason
        elif not _optimizers_for(spec, optimizer):
            reasons[backend] = f"it cannot step `optimizer={optimizer!r}`"
        elif (reason := spec.exclusion(stats, checkpointing)) is not None:
            reasons[backend] = reason
    return reasons


def cannot_run(backend: str, needs: RunNeeds) -> str | None:
    """What of the run `needs` backend `backend` cannot run, briefly (its engine's `refusals`); None: all of it."""
    refused = [what for what, _ in registry.spec(backend).engine.refusals(needs)]
    return f"it cannot run {', '.join(refused)}" if refused else None


def _optimizers_for(spec: BackendSpec, pinned: str | None) -> list[str]:
    """The optimizer state a backend would keep: its own conversions of the user's optimizer, or the pinned one
    where the backend can step it."""
    if pinned is None:
        return [o for o in (spec.exact_optimizer, spec.eight_bit_optimizer) if o]
    kept = spec.pinned_optimizer(pinned)
    return [kept] if kept else []


def choose(stats: ModelStats, machine: Machine, ceilings: Ceilings, plans: Sequence[Plan], *, accumulate: int = 1,
           allow_eight_bit: bool = False, margin: float = SAFETY_MARGIN, world_size: int = 1,
           ranks_per_host: int | None = None, holds_gradients: bool = False, clipping: str | None = None,
           disk: Disk | None = None, disk_pinned: bool = False) -> PlanReport:
    """The fastest plan that fits; exact-optimizer plans first unless `allow_eight_bit`. With `world_size` > 1 the
    memory is per GPU and per host (see `estimate_memory`); the step time stays the one-GPU estimate. Plans with
    state on `disk` must fit its free space, and unless `disk_pinned` their disk traffic must not make the step
    more than `DISK_BOUND_FACTOR` times its compute."""
    if not plans:
        raise ValueError("No candidate plan: the pinned levers exclude every backend (see the planner's table).")

    def memory_of(plan: Plan) -> MemoryEstimate:
        return estimate_memory(stats, plan, accumulate=accumulate, holds_gradients=holds_gradients,
                               clipping=clipping, world_size=world_size, ranks_per_host=ranks_per_host)

    def missing(plan: Plan, memory: MemoryEstimate | None = None) -> dict[str, float]:
        memory = memory or memory_of(plan)
        # Pinned arenas allocated at exactly the sizes counted here: only the rest of the host estimate needs the
        # margin.
        exact_host = memory.pinned_bytes if registry.spec(plan.backend).exact_pinned_host else 0
        return shortfalls(memory, machine, margin, exact_host_bytes=exact_host,
                          disk_free_bytes=disk.free_bytes if disk is not None else None)

    def step_of(plan: Plan) -> StepTime:
        return estimate_step_time(stats, plan, ceilings, accumulate=accumulate, disk=disk)

    def sized_on_gpu(plan: Plan) -> Plan:
        if registry.spec(plan.backend).sizes_blocks_on_gpu and plan.resident_blocks is None:
            return most_blocks_on_gpu(stats, plan, missing)
        return plan

    candidates = []
    seen: set[Plan] = set()
    for plan in plans:
        spec = registry.spec(plan.backend)
        if plan.disk_blocks is None and spec.sizes_blocks_on_disk is not None:
            plan = spec.sizes_blocks_on_disk(stats, plan, missing)
        if plan.checkpointing == "first_n" and plan.first_n is None:
            plan = fewest_blocks_checkpointed(stats, plan, missing, sized_on_gpu, step_of)
        plan = named_policy(stats, sized_on_gpu(plan))
        if plan in seen:  # a sized plan may repeat one of the coarse steps
            continue
        seen.add(plan)
        memory = memory_of(plan)
        step = step_of(plan)
        candidates.append(Candidate(plan, memory, step, missing(plan, memory), _disk_refusal(step, disk_pinned)))
    fitting = [c for c in ordered(candidates) if c.fits]
    exact = [c for c in fitting if c.plan.exact_optimizer]
    if fitting and (allow_eight_bit or not exact):
        chosen = fitting[0]
    elif exact:
        chosen = exact[0]
    else:
        chosen = None
    return PlanReport(stats, machine, ceilings, candidates, chosen, _reason(chosen, fitting, allow_eight_bit),
                      accumulate, world_size, ranks_per_host, holds_gradients, tuple(plans), disk, disk_pinned,
                      clipping=clipping, margin=margin)


def _disk_refusal(step: StepTime, disk_pinned: bool) -> str:
    if disk_pinned or step.disk <= (DISK_BOUND_FACTOR - 1) * step.compute:
        return ""
    return (f"disk traffic ({step.disk_read_bytes / 1e9:.1f} GB read, {step.disk_write_bytes / 1e9:.1f} GB written "
            f"per step) adds {step.disk:.3g} s to {step.compute:.3g} s of compute, over {DISK_BOUND_FACTOR:g}x; pin "
            "where the state goes on disk (`offload_device='nvme'`, `disk_blocks`) to accept it")


def most_blocks_on_gpu(stats: ModelStats, plan: Plan, missing: Callable[[Plan], dict[str, float]]) -> Plan:
    """`plan` with the most blocks on the GPU that fit - `host_adam`: blocks whose optimizer state is updated there,
    `stream`: blocks whose weights stay there. Either is never slower than the host's share (an update on the GPU,
    no copies over PCIe) and each block moved frees host memory. When none fits, the nearest miss."""
    sized = [dataclasses.replace(plan, resident_blocks=blocks) for blocks in range(stats.blocks + 1)]
    return max(sized, key=lambda p: (-sum(missing(p).values()), p.resident_blocks))


def fewest_blocks_checkpointed(stats: ModelStats, plan: Plan, missing: Callable[[Plan], dict[str, float]],
                               sized_on_gpu: Callable[[Plan], Plan], step_of: Callable[[Plan], StepTime]) -> Plan:
    """`plan` checkpointing the fewest of the model's first blocks that fit: each block kept whole saves its
    recompute. Where the backend also sizes its blocks on the GPU (`host_adam`'s state there competes for the same
    memory), each count gets the most of those that fit beside it, and the fastest pair that fits wins. When no
    count fits, every block (the nearest miss); where none need be, none (both: the plan of that name)."""
    counts = [sized_on_gpu(dataclasses.replace(plan, first_n=n)) for n in range(stats.blocks + 1)]
    fitting = [p for p in counts if not missing(p)]
    return min(fitting, key=lambda p: (step_of(p).total, p.first_n)) if fitting else counts[-1]


def named_policy(stats: ModelStats, plan: Plan) -> Plan:
    """A `first_n` plan that checkpoints no block or all of them, as the policy of that name (`none`, `full`): the
    same plan, one row in the table."""
    if plan.checkpointing != "first_n" or 0 < (plan.first_n or 0) < stats.blocks:
        return plan
    return dataclasses.replace(plan, checkpointing="full" if plan.first_n else "none", first_n=None)


def _reason(chosen: Candidate | None, fitting: list[Candidate], allow_eight_bit: bool) -> str:
    if chosen is None:
        return "No plan fits."
    if not chosen.plan.exact_optimizer and not allow_eight_bit:
        return (f"Chosen: {chosen.plan}: no plan with your optimizer's fp32 state fits, so the optimizer state is "
                "8-bit (pass `optimizer=` to pin one).")
    faster = [c for c in fitting if c.step_time_s < chosen.step_time_s]
    runner_up = next((c for c in fitting if c is not chosen and c.plan.exact_optimizer == chosen.plan.exact_optimizer),
                     None)
    why = f"the fastest plan that fits ({chosen.step_time_s:.3g} s/step"
    why += f" vs {runner_up.step_time_s:.3g} for {runner_up.plan})" if runner_up else ")"
    if faster:
        why += f"; {len(faster)} faster plan(s) use 8-bit optimizer state (pass `optimizer='adamw8bit'` to allow)"
    return f"Chosen: {chosen.plan}: {why}."


def scaled(stats: ModelStats, fraction: float) -> ModelStats:
    """`stats` at a micro-batch `fraction` of the measured one: activations and logits scale with the tokens. A
    chunked loss's workspace stays: it is one slice of logits, which reaches its `chunk_bytes` size at a few
    thousand tokens."""
    return dataclasses.replace(
        stats, activation_bytes_per_block=int(stats.activation_bytes_per_block * fraction),
        block_input_bytes=int(stats.block_input_bytes * fraction), logits=int(stats.logits * fraction),
        tokens=int(stats.tokens * fraction),
        outside_block_activation_bytes=int(stats.outside_block_activation_bytes * fraction))


def _refusal(report: PlanReport) -> PlanDoesNotFit:
    nearest = min(report.candidates, key=lambda c: (sum(c.shortfalls.values()), c.step_time_s))
    missing = nearest.refused or ", ".join(f"{tier} short by {gib:.1f} GiB" for tier, gib in nearest.shortfalls.items())
    plans = list(report.plans)
    hints = []
    pinned = {p.backend for p in plans}
    if len(pinned) == 1 and not report.machine.unified:
        other = _other_backend(report, pinned.pop())
        if other is not None:
            hints.append(f"`backend='{other.plan.backend}'` fits ({other.plan}, ~{other.step_time_s:.3g} s/step); "
                         "`backend='auto'` takes the fastest plan that fits")
    without_logits = _fits_without_logits(report, plans)
    if without_logits is not None:
        hints.append(f"a loss that never holds the full logits ({4 * report.stats.logits / GIB:.1f} GiB in fp32) "
                     f"fits with {without_logits.plan}: `lightning_offload.losses.ChunkedLMHeadLoss.adopt("
                     "model.lm_head)`, then `model.lm_head(hidden, targets)` returns the loss")
    hints += [f"`{name}` is left out: {why}" for name, why in report.left_out.items()]
    hints += _accumulation_hints(report, nearest, plans)
    hints += _clipping_hints(report, plans)
    for fraction in (0.5, 0.25, 0.125):
        smaller = _fitting(report, scaled(report.stats, fraction), plans)
        if smaller:
            hints.append(f"a micro-batch {int(1 / fraction)}x smaller fits with {smaller.plan} (accumulate "
                         f"{int(1 / fraction)}x more batches to keep the step's tokens)")
            break
    if not any(p.checkpointing == "full" for p in plans):
        hints.append("activation checkpointing (`activation_checkpointing='full'`) is pinned off")
    if all(p.exact_optimizer for p in plans):
        hints.append("8-bit optimizer state (`optimizer='adamw8bit'`) saves 6 bytes/param")
    limited = {tier: limit for tier, limit in report.machine.limits.items() if tier in nearest.shortfalls}
    for tier, limit in limited.items():
        hints.append(f"{limit} limits the {tier}: {nearest.plan} needs "
                     f"{nearest.shortfalls[tier] / SAFETY_MARGIN:.1f} GiB more of it")
    # Freeing host RAM alone would not fit a plan short of GPU too; under a limit, the limit is the lever.
    if set(nearest.shortfalls) == {"host RAM"} and not limited:
        hints.append(f"free {nearest.shortfalls['host RAM']:.1f} GiB more host RAM (close other processes)")
    if "disk" in nearest.shortfalls and report.disk is not None:
        hints.append(f"free {nearest.shortfalls['disk']:.1f} GiB more on {report.disk.path} or point `nvme_path` "
                     "at a larger drive")
    return PlanDoesNotFit(
        f"No plan fits this machine ({report.machine.describe()}, {100 * (1 - SAFETY_MARGIN):.0f}% of each kept "
        f"free) for {parameter_count(report.stats.parameters)} parameters. Nearest: {nearest.plan}: {missing} (needs "
        f"{nearest.memory.gpu_bytes / GIB:.1f} GiB GPU, {nearest.memory.host_bytes / GIB:.1f} GiB host"
        + (f", {nearest.memory.disk_bytes / GIB:.1f} GiB disk" if nearest.memory.disk else "") + "). "
        + ("What would help: " + "; ".join(hints) + "." if hints else "A machine with more memory is needed.")
    )


def _accumulation_hints(report: PlanReport, nearest: Candidate, plans: list[Plan]) -> list[str]:
    """Where accumulating is what does not fit: the micro-batches' gradients are kept whole until the optimizer
    step, 2-4 bytes/param that a model this size cannot spare. The same tokens as one larger micro-batch keep the
    step; one micro-batch per step keeps the model."""
    if report.accumulate == 1 or report.holds_gradients:
        return []
    micro_batches, tokens = report.accumulate, report.stats.tokens

    def total(accumulate: int) -> int:
        memory = estimate_memory(report.stats, nearest.plan, accumulate=accumulate, world_size=report.world_size,
                                 ranks_per_host=report.ranks_per_host)
        return memory.gpu_bytes + memory.host_bytes

    kept = (total(micro_batches) - total(1)) / GIB
    why = (f"accumulating {micro_batches} micro-batches keeps every gradient until the step ({kept:.1f} GiB for "
           f"{nearest.plan})")
    one_batch = _fitting(report, scaled(report.stats, micro_batches), plans, accumulate=1)
    if one_batch is not None:
        return [f"the step's {micro_batches * tokens} tokens as one micro-batch {micro_batches}x larger fit with "
                f"{one_batch.plan} (~{one_batch.step_time_s:.3g} s/step): {why}"]
    unaccumulated = _fitting(report, report.stats, plans, accumulate=1)
    if unaccumulated is not None:
        return [f"without gradient accumulation (`accumulate_grad_batches=1`, {tokens} tokens per step) "
                f"{unaccumulated.plan} fits: {why}"]
    return []


def _clipping_hints(report: PlanReport, plans: list[Plan]) -> list[str]:
    """Where clipping is what does not fit: by global norm, the plans that update inside backward then keep every
    gradient until backward ends; by value, those that leave it to Lightning after backward do. Not where a hook
    reads the gradients: it keeps them all without clipping too."""
    by_value = report.clipping == "value" and not report.holds_gradients
    if not (report.holds_gradients or by_value) or report.needs is not None and report.needs.gradient_hooks:
        return []
    unclipped = choose(report.stats, report.machine, report.ceilings, plans, allow_eight_bit=True,
                       accumulate=report.accumulate, world_size=report.world_size,
                       ranks_per_host=report.ranks_per_host, disk=report.disk, disk_pinned=report.disk_pinned).chosen
    if unclipped is None:
        return []
    if by_value:
        return [f"without gradient clipping by value (`gradient_clip_val=None`) {unclipped.plan} fits "
                f"(~{unclipped.step_time_s:.3g} s/step): clipping by value after backward keeps every gradient until "
                "backward ends"]
    return [f"without gradient clipping by norm (`gradient_clip_val=None`, or `gradient_clip_algorithm='value'`) "
            f"{unclipped.plan} fits (~{unclipped.step_time_s:.3g} s/step): clipping by the global norm keeps every "
            "gradient until backward ends"]


def _fits_without_logits(report: PlanReport, plans: list[Plan]) -> Candidate | None:
    """The plan that fits once the loss stops materialising the logits (`ChunkedLMHeadLoss`): their backward's
    gradients are replaced by the chunked loss's slice, and the fp32 log-softmax a full loss saves by the gradients
    the chunked one computes in forward and keeps (the head's weight and the hidden states, in the compute dtype)."""
    stats = report.stats
    if not stats.logits or not stats.tokens:
        return None
    vocab = stats.logits // stats.tokens
    log_softmax = min(4 * stats.logits, stats.outside_block_activation_bytes)
    kept_gradients = (vocab + stats.tokens) * stats.width * compute_weights(stats.precision)[1]
    chunked = dataclasses.replace(
        stats, logits=0, loss_workspace_bytes=slice_workspace_bytes(stats.tokens, vocab),
        outside_block_activation_bytes=stats.outside_block_activation_bytes - log_softmax + kept_gradients)
    return _fitting(report, chunked, plans)


def _other_backend(report: PlanReport, pinned: str) -> Candidate | None:
    """The fastest plan of another backend that fits at the same batch, for the refusal of a pinned backend."""
    backends = registry.multi_process_backends() if report.world_size > 1 else registry.available_backends()
    plans = candidate_plans(report.stats, backends=[b for b in backends if b != pinned], on_cuda=True,
                            accumulate=report.accumulate, needs=report.needs)
    return _fitting(report, report.stats, plans)


def _fitting(report: PlanReport, stats: ModelStats, plans: list[Plan],
             accumulate: int | None = None) -> Candidate | None:
    """The plan `choose` takes for `stats` from `plans` on the report's machine and batch (or `accumulate`
    micro-batches per step), 8-bit state allowed."""
    return choose(stats, report.machine, report.ceilings, plans, allow_eight_bit=True,
                  accumulate=report.accumulate if accumulate is None else accumulate, world_size=report.world_size,
                  ranks_per_host=report.ranks_per_host, holds_gradients=report.holds_gradients,
                  clipping=report.clipping, disk=report.disk, disk_pinned=report.disk_pinned).chosen
