"""DeepSpeed ZeRO-3 with parameters and optimizer state offloaded to host memory.

Lightning's own `DeepSpeedStrategy` refuses the CPU and lets DeepSpeed divide the loss by the accumulation steps a
second time; this backend drives the same engine from Lightning's ordinary loop instead: DeepSpeed's unmanaged
gradient accumulation (`managed_gradient_accumulation: false`) makes each `engine.step()` the boundary, so
Lightning's accumulation, LR scheduling and step counting behave exactly as in a plain run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import os
import shutil
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lightning_offload._distributed import checkpoint_ranks, ensure_process_group
from lightning_offload.activation_checkpointing import default_dtype
from lightning_offload.backends.base import (Backend, BackendConfig, LastEngine, TrainingSetup, copy_weights_by_name,
                                             persistent_buffers)
from lightning_offload.backends.init_functions import drawing_in, wrapped_init_functions
from lightning_offload.compile import refuse_compiled_submodules
from lightning_offload.norm_statistics import match_norm_weights_to_statistics
from lightning_offload.optim import to_cpu_adam
from lightning_offload.backends.spec import BackendSpec, MultiProcess, SavedTensor, grouped
from lightning_offload.planner.measure import ModelStats
from lightning_offload.planner.terms import (NVME_STATES, OPTIMIZER_STATE_BYTES, CandidateLevers, MemoryInputs,
                                             MemoryTerms, Plan, StepInputs, StepTime, checkpointed_blocks)
from lightning_offload.saving import atomic_directory

# Keys of a DeepSpeed config that the Trainer's own flags decide; a user config may not set them.
_TRAINER_OWNED_KEYS = {
    "gradient_accumulation_steps": "Trainer(accumulate_grad_batches=...)",
    "managed_gradient_accumulation": "Trainer(accumulate_grad_batches=...)",
    "train_batch_size": "the DataLoader's batch size",
    "train_micro_batch_size_per_gpu": "the DataLoader's batch size",
    "gradient_clipping": "Trainer(gradient_clip_val=...)",
    "bf16": "Trainer(precision=...)",
    "fp16": "Trainer(precision=...)",
    "optimizer": "LightningModule.configure_optimizers",
    "scheduler": "LightningModule.configure_optimizers",
}
# DeepSpeed ZeRO-3 offload holds more host memory than its documented partitions (bf16 weights 2, fp32 master 4,
# fp32 gradients 4, Adam state 8 bytes/param): bf16 gradient partitions, swap buffers and the pinned allocator's
# rounding (bench/RESULTS.md, "Calibration constants").
ENGINE_HOST_BYTES_PER_PARAM = 6.8
# ZeRO-Infinity's buffers as this backend configures them with state on NVMe (`offload_device="nvme"`):
# five pinned bf16 parameter swap buffers of `NVME_BUFFER_NUMEL` elements (a parameter larger than one
# stays in host memory: 250M covers every matrix of a 70B Llama block, 8192 x 28672), the bf16 partitions of the
# first billion parameters kept in host memory (DeepSpeed's `max_in_cpu`), and four pinned fp32 optimizer swap
# buffers of one sub-group (`sub_group_size`) each. The fp32 gradient partitions stay in host memory as with CPU
# offload, and are written to disk once per step for the sub-group updates to read back.
NVME_BUFFER_COUNT = 5
NVME_BUFFER_NUMEL = 250_000_000
NVME_PARAMS_IN_HOST = 1_000_000_000
NVME_OPTIMIZER_BUFFER_COUNT = 4
NVME_SUB_GROUP_NUMEL = 100_000_000
# The engine's host optimizer phase (CPU Adam plus copying fp32 gradients into partitions and bf16 weights back)
# reaches this share of the fused CPU AdamW rate the planner's probe reads (bench/RESULTS.md, "Calibration constants").
OPTIMIZER_PHASE_SHARE = 0.385
_CHECKPOINT_TAG = "checkpoint"
_SWAPPED_OPTIMIZER_CHECKPOINT = (
    "DeepSpeed ZeRO-3 checkpoints leave out the optimizer state it swaps to NVMe (its fp32 weights are saved empty, "
    "and no checkpoint loads into it), so the `deepspeed` backend cannot save or resume with "
    "`nvme_state={state!r}`. To checkpoint, keep the optimizer state in host memory: `nvme_state='parameters'` "
    "(bf16 weights on disk) or `offload_device='cpu'`."
)
# DeepSpeed's async I/O settings for swap files: 1 MiB requests, 8 in flight per thread (its tuning tool's usual
# best on one NVMe drive); `config={"aio": {...}}` overrides them.
_AIO = {"block_size": 1_048_576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
        "overlap_events": True}


@dataclass(kw_only=True)
class DeepSpeedConfig(BackendConfig):
    offload_parameters: bool = True
    """Keep the partitioned bf16 parameters in host memory between uses (ZeRO-3 `offload_param`)."""
    offload_optimizer: bool = True
    """Keep fp32 master weights, gradients and optimizer state in host memory and step them there."""
    pin_memory: bool = True
    """Page-locked host buffers: PCIe copies run ~6x faster, at the cost of memory the OS cannot swap."""
    zero_init: bool = True
    """Build `configure_model` already partitioned, so the full fp32 model never exists in memory."""
    prefetch_bucket_size: int = 50_000_000
    """Parameters fetched ahead of use; larger hides more PCIe latency and costs GPU memory."""
    param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay resident on the GPU (biases, norms): fewer tiny copies."""
    max_live_parameters: int = 1_000_000_000
    """Upper bound of gathered parameters on the GPU at once."""
    reduce_bucket_size: int = 200_000_000
    """Gradient elements moved to the host per bucket."""
    offload_device: str | None = None
    """Where offloaded state lives: `cpu` (host memory) or `nvme` (ZeRO-Infinity: files under `nvme_path`, read
    and written with DeepSpeed's async I/O, which needs libaio). None: host memory, unless `nvme_path` is given
    and the planner finds host memory short (without a plan: `nvme` whenever `nvme_path` is given)."""
    nvme_path: str | None = None
    """A folder on a local NVMe drive for state on disk; the engine's swap files go to a subfolder removed at exit."""
    nvme_state: str | None = None
    """On `nvme`: `all` state, only the `parameters` (bf16 weights, 2 bytes/param on disk, read at every gather) or
    only the `optimizer` (fp32 master weights, gradients and Adam state, 16 bytes/param, read and written once per
    step). None: the planner's choice (`all` without a plan)."""
    nvme_buffer_numel: int = NVME_BUFFER_NUMEL
    """Parameters on NVMe: elements of each of the five pinned bf16 swap buffers; a larger parameter stays in host
    memory. The default covers every matrix of a 70B Llama block (the planner counts the default)."""
    config: dict[str, Any] | None = None
    """A raw DeepSpeed config merged over the one built from the fields above (the user's keys win)."""

    def __post_init__(self) -> None:
        if self.offload_device not in (None, "cpu", "nvme"):
            raise ValueError(f"`offload_device={self.offload_device!r}` is unknown. Choose 'cpu' or 'nvme'.")
        if self.nvme_state not in (None, *NVME_STATES):
            raise ValueError(f"`nvme_state={self.nvme_state!r}` is unknown. Choose one of {list(NVME_STATES)}.")
        if self.offload_device == "nvme" and self.nvme_path is None:
            raise ValueError("`offload_device='nvme'` needs a folder on a local NVMe drive: pass `nvme_path=...`.")
        owned = sorted(set(self.config or {}) & set(_TRAINER_OWNED_KEYS))
        if owned:
            hints = "; ".join(f"`{key}` comes from {_TRAINER_OWNED_KEYS[key]}" for key in owned)
            raise ValueError(f"The DeepSpeed config may not set {owned}: {hints}.")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _forget_forward_stack(module: torch.nn.Module) -> None:
    """Takes `module` and its submodules off ZeRO-3's process-wide forward stack, which keeps the root module of
    every engine built (and the modules a forward interrupted inside them) and which `engine.destroy()` leaves as it
    is: each run's model, Trainer and optimizer state stayed alive."""
    from deepspeed.runtime.zero import parameter_offload

    own = {id(submodule) for submodule in module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in own]


def _unroot(engine: Any) -> None:
    """Removes the references through which ZeRO-3 keeps a run alive where Python's garbage collector cannot free
    it, so that a run the user drops (the model and its Trainer) is freed with them: the root module on the
    process-wide forward stack, and the gradient hooks on the parameters' accumulation nodes (C++ objects that hold
    the optimizer and, through it, the model). Only a backward needs the hooks, and every fit builds a new engine."""
    _forget_forward_stack(engine.module)
    for hook in getattr(engine.optimizer, "_grad_acc_hooks", []):
        hook.remove()


_caches_to_empty = False


def _empty_caches_after_this_collection() -> None:
    """Runs when a run the user dropped is collected (before its memory is freed): the collection's end hands the
    GPU and pinned host memory torch caches for it back (`_empty_caches_once_collected`)."""
    global _caches_to_empty
    _caches_to_empty = True
    if _empty_caches_once_collected not in gc.callbacks:
        gc.callbacks.append(_empty_caches_once_collected)


def _empty_caches_once_collected(phase: str, _info: dict[str, int]) -> None:
    global _caches_to_empty
    if phase == "stop" and _caches_to_empty:
        _caches_to_empty = False
        _empty_caches()


def _empty_caches() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # Freed pinned blocks stay cached by torch (and count as shared memory to the OOM killer) until emptied.
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if empty_host_cache is not None:
            empty_host_cache()


def _partitioned(tensor: torch.Tensor) -> bool:
    """Whether zero.Init has partitioned `tensor`, leaving a 0-element placeholder until it is gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(tensor, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE


def _init_functions_reach_partitioned_parameters() -> AbstractContextManager:
    """Makes `torch.nn.init.*` calls on already-partitioned parameters take effect.

    zero.Init partitions every module's parameters as soon as that module's `__init__` returns, so a model that
    initialises its weights afterwards (`for m in self.modules(): nn.init.normal_(m.weight)`, the usual pattern)
    writes into 0-element placeholders and silently keeps the default init. DeepSpeed asks such models to wrap the
    writes in `GatheredParameters`; here the wrapping is done for them, one parameter at a time.

    zero.Init also casts the parameters to the engine's dtype (bf16): the init draws in the dtype the parameter was
    built in (`drawing_in`), so the weights are those of the model built without the strategy.
    """
    import deepspeed

    def gathering(init_function: Any) -> Any:
        @functools.wraps(init_function)
        def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not _partitioned(tensor):
                return init_function(tensor, *args, **kwargs)
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                drawing_in(torch.get_default_dtype())(init_function)(tensor, *args, **kwargs)
            return tensor

        return initialise

    return wrapped_init_functions(gathering)


@contextmanager
def _copies_of_partitioned_parameters_are_whole() -> Iterator[None]:
    """Makes `copy.deepcopy` of an already-partitioned parameter copy its weights.

    A module that clones a built layer (`nn.TransformerEncoder` deep-copies its `encoder_layer`) would copy the
    0-element placeholder zero.Init leaves once a module's `__init__` returns. The copy is an ordinary parameter in
    host memory, gathered from the original, which the engine partitions when it starts, as it partitions a model
    built without zero.Init.
    """
    import deepspeed

    deepcopy_parameter = torch.nn.Parameter.__deepcopy__

    def deepcopy_gathered(param: torch.nn.Parameter, memo: dict) -> torch.nn.Parameter:
        if id(param) in memo or not _partitioned(param):
            return deepcopy_parameter(param, memo)
        with deepspeed.zero.GatheredParameters([param]):
            copied = type(param)(param.data.to("cpu", copy=True), param.requires_grad)
        memo[id(param)] = copied
        return copied

    torch.nn.Parameter.__deepcopy__ = deepcopy_gathered  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Parameter.__deepcopy__ = deepcopy_parameter  # type: ignore[method-assign]


@contextmanager
def _parametrizations_read_partitioned_weights() -> Iterator[None]:
    """Makes a parametrization (`weight_norm`, `spectral_norm`, `orthogonal`, any `register_parametrization`) of an
    already-partitioned module read its weights.

    A parametrization added once the module's `__init__` has returned would be computed (weight norm's magnitude and
    direction, spectral norm's power iteration) from the 0-element placeholder. The module's own parameters are
    gathered while it is added; the parametrization's parameters and buffers are partitioned by zero.Init as their
    module's `__init__` returns.
    """
    import deepspeed
    from torch.nn.utils import parametrizations, parametrize

    def gathering(add: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(add)
        def add_gathered(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            partitioned = [p for p in module.parameters(recurse=False) if _partitioned(p)]
            if not partitioned:
                return add(module, *args, **kwargs)
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
                return add(module, *args, **kwargs)

        return add_gathered

    adders = [(parametrize, "register_parametrization"),
              *((parametrizations, name) for name in ("weight_norm", "spectral_norm", "orthogonal"))]
    originals = [getattr(namespace, name) for namespace, name in adders]
    try:
        for (namespace, name), add in zip(adders, originals, strict=True):
            setattr(namespace, name, gathering(add))
        yield
    finally:
        for (namespace, name), add in zip(adders, originals, strict=True):
            setattr(namespace, name, add)


@contextmanager
def _transformers_sees_zero3(config: dict[str, Any]) -> Iterator[None]:
    """Lets `from_pretrained` in `configure_model` load into partitioned parameters: `transformers` gathers each
    module's weights while it loads them only while a `HfDeepSpeedConfig` of stage 3 is alive."""
    # transformers' DeepSpeed integration needs accelerate: without it no model loads partitioned, and the rest runs.
    if find_spec("transformers") is None or find_spec("accelerate") is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    alive = HfDeepSpeedConfig(config)  # transformers holds a weak reference: it lasts as long as this name
    try:
        yield
    finally:
        del alive


def _precision_config(precision: str) -> dict[str, Any]:
    if precision.startswith("bf16"):
        return {"bf16": {"enabled": True}}
    if precision.startswith("16"):
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    return {}  # 32-true: DeepSpeed's own default


def _trainable_share(module: torch.nn.Module) -> int:
    """Trainable parameters in this process's partition (ZeRO-3 cuts each parameter across the processes)."""
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad) // ranks


def _refuse_other_world_size(path: Path, world_size: int) -> None:
    # ZeRO-3 keeps one file of fp32 weights and optimizer state per rank, cut for that many ranks; DeepSpeed would
    # fail later with a less helpful message (or, when loading weights only, read the wrong slices).
    tag = (path / "latest").read_text(errors="replace").strip()
    if not tag or "/" in tag or not (path / tag).is_dir():
        raise ValueError(
            f"The checkpoint {str(path)!r} is damaged: its `latest` file names {tag[:80]!r}, which is not a folder "
            f"of the checkpoint (a complete one names {_CHECKPOINT_TAG!r}). Resume from an earlier checkpoint."
        )
    saved = len(list((path / tag).glob("zero_pp_rank_*_mp_rank_*_optim_states.pt")))
    if saved and saved != world_size:
        raise ValueError(
            f"The checkpoint {str(path)!r} was written by {saved} process(es) and this run has {world_size}: the "
            "`deepspeed` backend partitions weights and optimizer state per process and resumes only with the same "
            f"number (`devices` x `num_nodes` = {saved}). To go on with another number of processes, take the "
            "weights with `lightning_offload.consolidate(path)` (the optimizer state restarts), or train with the "
            "`fsdp` backend and a `torch.optim` optimizer, whose checkpoints resume with any number."
        )


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    Config = DeepSpeedConfig
    saves_own_state = True
    manual_optimization_refusal = (
        "DeepSpeed reduces and partitions gradients inside backward and steps on its own accumulation boundary."
    )
    compile_blocks_refusal = "ZeRO-3 gathers each layer's weights in hooks on the modules inside a block."
    gradient_hooks_refusal = "reduces each gradient into DeepSpeed's own partitions during backward."
    clipping_refusals = {"value": "clips by global norm only. Use `gradient_clip_algorithm='norm'`."}
    precision_advice = ". Use 'bf16-mixed' (recommended), 'bf16-true', '16-mixed', '16-true' or '32-true'"
    callback_refusals = {
        "WeightAveraging": "its averaged copy reads and writes the module's parameters, which ZeRO-3 partitions into "
                           "0-element placeholders. Pin `backend='host_adam'` or `'gpu_8bit'`, or remove the callback.",
        "StochasticWeightAveraging": "its `SWALR` schedules a torch optimizer, and this backend steps DeepSpeed's. "
                                     "Pin `backend='host_adam'` or `'gpu_8bit'`, or remove the callback.",
        "LearningRateFinder": "the finder's LR schedule drives a torch optimizer, and this backend steps DeepSpeed's. "
                              "Find the lr with another backend (`backend='fsdp'` or `'host_adam'`), then pass it.",
    }

    # Held weakly: the engine holds the module, so a run the user dropped is freed with it (see `_unroot`).
    _live: ClassVar[LastEngine[DeepSpeedBackend]] = LastEngine(weak=True)

    def __init__(self, config: DeepSpeedConfig) -> None:
        super().__init__(config)
        self.config: DeepSpeedConfig = config
        self._engine: Any = None
        self._trains: torch.nn.Module | None = None
        """The module `_engine` trains (None: an inference engine, or none)."""
        self._precision = "32-true"
        self._torch_linear: Any = None
        """`torch.nn.functional.linear` as it was before zero.Init replaced it; put back at `teardown`."""
        self._swap: weakref.finalize | None = None
        self._swap_path = ""
        self._params_in_host = NVME_PARAMS_IN_HOST
        """With parameters on NVMe: how many DeepSpeed keeps in pinned host memory too (`max_in_cpu`)."""
        weakref.finalize(self, _empty_caches_after_this_collection).atexit = False

    def _initialize(self, module: torch.nn.Module, **kwargs: Any) -> tuple[Any, ...]:
        import deepspeed

        previous = DeepSpeedBackend._live.take()
        if previous is not None:
            previous.release()
        if self._torch_linear is None:  # ZeRO-3 partitions a model built outside zero.Init through it: the same swap
            self._torch_linear = torch.nn.functional.linear
        match_norm_weights_to_statistics(module)
        engine, *rest = deepspeed.initialize(model=module, dist_init_required=False, **kwargs)
        self._engine, self._trains = engine, module if kwargs.get("optimizer") is not None else None
        DeepSpeedBackend._live.keep(self)
        return (engine, *rest)

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise RuntimeError(
                "This run's DeepSpeed engine was released when a later `fit`/`validate` started in this process. "
                "Save checkpoints before starting the next run."
            )
        return self._engine

    def release(self) -> None:
        """Destroys the engine: removes its hooks from the module and frees its device and pinned memory."""
        if self._engine is not None:
            module = self._engine.module
            self._engine.destroy()
            self._engine = self._trains = None
            _forget_forward_stack(module)
        DeepSpeedBackend._live.forget(self)
        gc.collect()
        _empty_caches()

    def setup_environment(self, device: torch.device) -> None:
        from deepspeed.accelerator import get_accelerator, set_accelerator

        # DeepSpeed picks its accelerator once per process from what is installed; follow the Trainer instead, so
        # `accelerator="cpu"` on a GPU machine (and the reverse, in one notebook) uses the device the user chose.
        if get_accelerator().device_name() != device.type:
            if device.type == "cpu":
                from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
            else:
                from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
            set_accelerator(Accelerator())
        ensure_process_group(device)
        if self._nvme_state():
            self._swap_folder()  # a missing, unwritable or O_DIRECT-less `nvme_path` is refused before any work

    def precision_plugin(self, plugins: ModuleType, precision: str, trainer_plugin: Any) -> Any:
        # Lightning's DeepSpeed precision plugin routes backward and step through the engine and leaves clipping to it.
        class InEngineDtype(plugins.DeepSpeedPrecision):
            def forward_context(self) -> AbstractContextManager:
                # The engine computes in its weights' dtype without autocast (at `-mixed` as at `-true`): as under
                # Lightning's `bf16-true`, tensors a step creates (a lazily built table) come out in that dtype, not
                # fp32 that would promote the activations before they meet the weights.
                return default_dtype(self._desired_dtype)

        return InEngineDtype(precision)

    def _nvme_state(self) -> str | None:
        """The state kept on disk (`all`, `parameters`, `optimizer`), or None for host memory."""
        device = self.configured_or_planned("offload_device", "nvme" if self.config.nvme_path else "cpu")
        return self.configured_or_planned("nvme_state", "all") if device == "nvme" else None

    def _optimizer_on_disk(self) -> bool:
        return self.config.offload_optimizer and self._nvme_state() in ("all", "optimizer")

    def _parameter_device(self) -> str:
        return "nvme" if self._nvme_state() in ("all", "parameters") else "cpu"

    def _swap_folder(self) -> str:
        """This backend's folder for swap files under `nvme_path`, checked and made on first use; removed when the
        backend is collected or the process exits (the files are scratch: checkpoints hold the state)."""
        if self._swap is None:
            from lightning_offload.planner.disk import check_disk_path

            disk = check_disk_path(self.config.nvme_path)
            folder = Path(tempfile.mkdtemp(prefix="lightning_offload-deepspeed-", dir=disk))
            self._swap = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
            self._swap_path = str(folder)
        return self._swap_path

    def engine_config(self, setup: TrainingSetup | None) -> dict[str, Any]:
        cfg = self.config
        offload = {"device": "cpu", "pin_memory": cfg.pin_memory}
        on_disk = self._nvme_state()
        swap = {"device": "nvme", "nvme_path": self._swap_folder(), "pin_memory": cfg.pin_memory} if on_disk else {}
        zero: dict[str, Any] = {
            "stage": 3,
            "stage3_prefetch_bucket_size": cfg.prefetch_bucket_size,
            "stage3_param_persistence_threshold": cfg.param_persistence_threshold,
            "stage3_max_live_parameters": cfg.max_live_parameters,
            "reduce_bucket_size": cfg.reduce_bucket_size,
        }
        if cfg.offload_parameters:
            zero["offload_param"] = dict(offload)
            if on_disk in ("all", "parameters"):
                zero["offload_param"] = dict(swap, buffer_count=NVME_BUFFER_COUNT,
                                             buffer_size=cfg.nvme_buffer_numel,
                                             max_in_cpu=self._params_in_host)
        if cfg.offload_optimizer and setup is not None:
            zero["offload_optimizer"] = dict(offload)
            if on_disk in ("all", "optimizer"):
                zero["offload_optimizer"] = dict(swap, buffer_count=NVME_OPTIMIZER_BUFFER_COUNT)
                zero["sub_group_size"] = NVME_SUB_GROUP_NUMEL
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
            **_precision_config(self._precision),
        }
        if on_disk:
            config["aio"] = dict(_AIO)
        if setup is not None:
            config.update(
                # Lightning divides the loss by `accumulate_grad_batches` and calls `step()` at the boundary.
                managed_gradient_accumulation=False,
                gradient_clipping=float(setup.gradient_clip_val or 0.0),
                # The user's optimizer class is honoured: non-Adam optimizers step the host partitions as they are.
                zero_allow_untested_optimizer=True,
                zero_force_ds_cpu_optimizer=False,
            )
        return _merge(config, cfg.config or {})

    @contextmanager
    def model_init_context(self) -> Iterator[None]:
        if not self.config.zero_init:
            yield
            return
        import deepspeed

        # zero.Init replaces `torch.nn.functional.linear` with DeepSpeed's autograd function for the rest of the
        # process ("This will persist unless manually reset"): every later run in it (plain Lightning, another
        # backend) would compute its linear layers, and order their gradients, through DeepSpeed's. This run keeps
        # it; `teardown` puts torch's back.
        if self._torch_linear is None:
            self._torch_linear = torch.nn.functional.linear
        config = self.engine_config(setup=None)
        with deepspeed.zero.Init(
            config_dict_or_path=config,
            remote_device=self._parameter_device() if self.config.offload_parameters else None,
            pin_memory=self.config.pin_memory,
        ), _init_functions_reach_partitioned_parameters(), _copies_of_partitioned_parameters_are_whole(), \
                _parametrizations_read_partitioned_weights(), _transformers_sees_zero3(config):
            yield

    def optimizer_state_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if self.config.offload_optimizer else device

    def prepare_module(self, module: torch.nn.Module) -> torch.nn.Module:
        refuse_compiled_submodules(module, self.name, "gathers their weights")
        return module

    def prepare_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return to_cpu_adam(optimizer) if self.config.offload_optimizer else optimizer

    def setup_training(
        self, module: torch.nn.Module, optimizer: Optimizer, setup: TrainingSetup
    ) -> tuple[torch.nn.Module, Optimizer]:
        if self._optimizer_on_disk():
            from lightning_offload.planner.disk import check_disk_room

            warnings.warn(_SWAPPED_OPTIMIZER_CHECKPOINT.format(state=self._nvme_state()), stacklevel=2)

            params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
            check_disk_room(self._swap_folder(), 16 * params, what=f"the optimizer state of {params:,} parameters "
                            "(fp32 master weights, gradients and Adam moments: 16 bytes each)")
        elif self.config.offload_optimizer:
            self._refuse_optimizer_state_beyond_host_room(module)
        if self._parameter_device() == "nvme":
            self._params_in_host = self.params_in_host_within_budget(module)
        engine, zero_optimizer, _, _ = self._initialize(module, optimizer=optimizer, config=self.engine_config(setup))
        return engine, zero_optimizer

    def params_in_host_within_budget(self, module: torch.nn.Module) -> int:
        """With parameters on NVMe, how many DeepSpeed may also keep in pinned host memory (bf16, `max_in_cpu`): its
        default, within what the host budget leaves after this process's optimizer state kept there."""
        room = self.host_memory_available().bytes
        if self.config.offload_optimizer and not self._optimizer_on_disk():
            room -= 16 * _trainable_share(module)
        return max(0, min(NVME_PARAMS_IN_HOST, room // 2))

    def _refuse_optimizer_state_beyond_host_room(self, module: torch.nn.Module) -> None:
        """Refuses, before DeepSpeed allocates it, optimizer state in host memory beyond what this process may use
        (its budget, the job's cgroup limit): this process's share of the fp32 master weights, gradients and Adam
        moments, 16 bytes per parameter."""
        from lightning_offload.planner.budget import refuse_beyond_host_room

        share = _trainable_share(module)
        refuse_beyond_host_room(
            16 * share, self.host_memory_available(),
            what=f"The `deepspeed` backend's optimizer state of {share:,} parameters (this process's share)",
            fix="Keep it on disk (`offload_device='nvme'`, `nvme_path=...`), train across more processes, or let "
                "`backend='auto'` choose a plan with less host memory.",
        )

    def setup_inference(self, module: torch.nn.Module, precision: str) -> torch.nn.Module:
        if self._engine is not None and self._trains is module:
            # validate / test / predict after `fit`: the training engine evaluates the module as it did during fit,
            # and keeps the optimizer state a later `save_checkpoint` or `fit` needs.
            from deepspeed.runtime.zero import parameter_offload

            parameter_offload.FWD_MODULE_STACK.append(module)  # where ZeRO-3 set it up; `_unroot` took it off
            return self._engine
        self.set_precision(precision)
        engine, *_ = self._initialize(module, config=self.engine_config(setup=None))
        return engine

    def save_checkpoint(self, path: Path, client_state: dict[str, Any], *, weights_only: bool = False) -> None:
        engine = self.engine  # raises, naming the later run, where that run released this one's engine
        if self._optimizer_on_disk():
            raise RuntimeError(_SWAPPED_OPTIMIZER_CHECKPOINT.format(state=self._nvme_state()))
        if self._trains is None:
            raise RuntimeError(
                "The `deepspeed` backend saves checkpoints of a module it trains; this one was set up for "
                "validate / test / predict only (DeepSpeed's inference engine writes no checkpoint). Save after "
                "`trainer.fit(model)`, or take the weights of the checkpoint it was loaded from."
            )
        # Every rank writes its partitions into the same folder (on a file system all ranks see).
        with atomic_directory(path, ranks=checkpoint_ranks(), weights_only=weights_only) as staging:
            engine.save_checkpoint(str(staging), client_state=client_state, tag=_CHECKPOINT_TAG)
            if weights_only:
                self._drop_optimizer_state(staging / _CHECKPOINT_TAG)
            # DeepSpeed drops conversion scripts next to every checkpoint; `lightning_offload.consolidate` does that
            # job, so the checkpoint holds only state.
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (staging / script).unlink(missing_ok=True)

    def _drop_optimizer_state(self, folder: Path) -> None:
        """Rewrites this rank's optimizer file with its fp32 partitions (the weights) but without the optimizer's
        state (Adam moments): DeepSpeed writes both, `weights_only=True` asks for the weights."""
        for file in folder.glob(f"*zero_pp_rank_{self.engine.global_rank}_mp_rank_*optim_states.pt"):
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
            state["optimizer_state_dict"]["optimizer_state_dict"]["state"] = {}
            rewritten = file.with_name(f".{file.name}.weights")
            torch.save(state, rewritten)
            del state
            os.replace(rewritten, file)

    def load_checkpoint(self, path: Path, *, load_optimizer_states: bool, strict: bool) -> dict[str, Any]:
        if self._optimizer_on_disk():
            raise RuntimeError(_SWAPPED_OPTIMIZER_CHECKPOINT.format(state=self._nvme_state()))
        if not (path / "latest").is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is not a checkpoint written by the `deepspeed` backend (a folder with a `latest` file). "
                "To start from plain weights, load them with `module.load_state_dict(...)` before `fit`."
            )
        if not load_optimizer_states:
            return self._load_weights(path, strict)
        _refuse_other_world_size(path, self.engine.dp_world_size)
        load_path, client_state = self.engine.load_checkpoint(
            str(path),
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=False,
            load_module_strict=strict,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {str(path)!r}.")
        return client_state or {}

    def _load_weights(self, path: Path, strict: bool) -> dict[str, Any]:
        """validate / test / predict: the fp32 weights, gathered from every rank's partitions one at a time, into the
        module's partitions. DeepSpeed's own load without optimizer state reads its model file, whose ZeRO-3
        parameters are empty placeholders."""
        self._copy_weights(fp32_tensors(path), f"The checkpoint {str(path)!r}", strict)
        return client_state(path)

    def load_model_state_dict(self, module: torch.nn.Module, state_dict: dict[str, Any], strict: bool) -> None:
        """validate / test / predict from another backend's checkpoint (or Lightning's file): its weights into the
        module's partitions."""
        self._copy_weights(iter(state_dict.items()), "The checkpoint", strict)

    def _copy_weights(self, tensors: Iterator[tuple[str, torch.Tensor]], checkpoint: str, strict: bool) -> None:
        import deepspeed

        def gathered_copy(target: torch.Tensor, value: torch.Tensor) -> None:
            with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                target.data.copy_(value)

        module = self.engine.module
        targets = {**dict(module.named_parameters(remove_duplicate=False)), **persistent_buffers(module)}
        copy_weights_by_name(targets, tensors, checkpoint, strict, copy=gathered_copy)
        optimizer = getattr(self.engine, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "refresh_fp32_params"):
            # After a fit: the optimizer's fp32 partitions, which it steps and a later save writes, follow.
            optimizer.refresh_fp32_params()

    def teardown(self) -> None:
        if self._engine is not None:
            _unroot(self._engine)
        if self._torch_linear is not None:
            torch.nn.functional.linear, self._torch_linear = self._torch_linear, None
        _empty_caches()

    def describe(self) -> str:
        cfg = self.config
        on_disk = self._nvme_state()
        disk = f"NVMe under {cfg.nvme_path!r}"
        where_params = (disk if on_disk in ("all", "parameters") else "host memory") if cfg.offload_parameters \
            else "the device"
        where_optim = (f"{disk if on_disk in ('all', 'optimizer') else 'host memory'} (DeepSpeed CPU Adam for "
                       "Adam/AdamW)") if cfg.offload_optimizer else "the device"
        pinned = "pinned" if cfg.pin_memory else "pageable"
        return (
            f"DeepSpeed ZeRO-3 ({self._precision}): parameters partitioned in {where_params}; "
            f"gradients, fp32 master weights and optimizer state in {where_optim}; {pinned} buffers"
        )


def memory_terms(inputs: MemoryInputs) -> MemoryTerms:
    stats, plan = inputs.stats, inputs.plan
    params, trained = stats.parameters, stats.trainable_parameters
    weights, size = inputs.weights  # the engine's partitions, gathers and buckets (fp32 under `32-true`)
    gathered = size * max(stats.block_parameters, stats.other_parameters)
    gpu = {f"gathered {weights} weights (two blocks)": 2 * gathered,
           "prefetch bucket": size * DeepSpeedConfig.prefetch_bucket_size,
           f"gradient reduce buckets ({weights}, double-buffered)": 2 * size * DeepSpeedConfig.reduce_bucket_size}
    # ZeRO-3 keeps fp32 partitions of the trainable parameters only; every parameter has a partition in the
    # engine's dtype besides.
    host = {"weight partitions": size * params, "fp32 master weights": 4 * trained, "fp32 gradients": 4 * trained,
            "optimizer state": int(inputs.state_bytes * trained),
            "engine buffers (bf16 gradient partitions, swap)": int(ENGINE_HOST_BYTES_PER_PARAM * trained)}
    disk: dict[str, int] = {}
    if plan.on_disk:
        host, disk = _nvme_terms(stats, plan, host, size)
    return MemoryTerms(gpu, host, frozenset(host) if plan.pin_memory else frozenset(), disk)


def _nvme_terms(stats: ModelStats, plan: Plan, in_host: dict[str, int],
                weight_bytes: int) -> tuple[dict[str, int], dict[str, int]]:
    """ZeRO-Infinity: the host terms that move to disk (the `NVME_*` buffers take their place in host memory), and
    the disk's terms. The engine's own buffers are kept at their host-offload size until measured."""
    params, host, disk = stats.parameters, dict(in_host), {}
    if plan.parameters_on_disk:
        # Parameters outside the blocks (embeddings, output layer) may be larger than a swap buffer: counted in host
        # memory, like the partitions DeepSpeed keeps there.
        kept = min(params, NVME_PARAMS_IN_HOST + stats.other_parameters)
        host["weight partitions"] = weight_bytes * kept
        host["parameter swap buffers"] = 2 * NVME_BUFFER_COUNT * NVME_BUFFER_NUMEL
        disk["weight partitions"] = weight_bytes * (params - kept)
    if plan.optimizer_on_disk:
        for term in ("fp32 master weights", "optimizer state"):
            disk[term] = host.pop(term)
        disk["fp32 gradients"] = host["fp32 gradients"]  # written once per step for the sub-group updates
        sub_group = min(params, NVME_SUB_GROUP_NUMEL)
        host["optimizer swap buffers"] = 4 * NVME_OPTIMIZER_BUFFER_COUNT * sub_group
    return host, disk


def disk_traffic(stats: ModelStats, plan: Plan, *, accumulate: int = 1) -> tuple[int, int, int]:
    """Bytes a plan on NVMe moves per optimizer step: (parameter reads under forward and backward, optimizer reads,
    writes). Parameters on disk are read at every gather (forward, recompute, backward) and written once after the
    update; the optimizer's sub-groups read their fp32 master weights, state and gradients and write the first two
    back, after the gradients were written at the step's boundary."""
    if not plan.on_disk:
        return 0, 0, 0
    params = stats.parameters
    passes = 2 + (1 if checkpointed_blocks(stats, plan) else 0)
    on_disk = max(0, params - NVME_PARAMS_IN_HOST - stats.other_parameters) if plan.parameters_on_disk else 0
    parameter_reads = accumulate * passes * 2 * on_disk
    optimizer_bytes = (4 + OPTIMIZER_STATE_BYTES[plan.optimizer]) * params if plan.optimizer_on_disk else 0
    gradient_bytes = 4 * params if plan.optimizer_on_disk else 0
    reads = int(optimizer_bytes + gradient_bytes)
    writes = int(2 * on_disk + optimizer_bytes + gradient_bytes)
    return parameter_reads, reads, writes


def step_time(inputs: StepInputs) -> StepTime:
    """bf16 weights come in for every gather and bf16 gradients go out per micro-batch; CPU Adam steps after."""
    stats, plan, compute, offload = inputs.stats, inputs.plan, inputs.compute, inputs.offload
    params = stats.parameters
    weights_in = inputs.accumulate * inputs.passes * 2 * params / inputs.h2d
    gradients_out = inputs.accumulate * 2 * params / inputs.d2h
    optimizer = params / (inputs.cpu_adamw * OPTIMIZER_PHASE_SHARE)
    total = max(compute, weights_in + offload) + gradients_out + optimizer
    if not plan.on_disk:
        return StepTime(compute, weights_in + gradients_out + offload, optimizer, total)
    if inputs.disk is None:
        raise ValueError(f"The plan {plan} keeps state on disk: pass the `Disk` it uses (`load_or_probe_disk`).")
    # Parameter reads are prefetched under forward and backward; the optimizer's sub-groups wait for their
    # reads and writes (DeepSpeed's swapper without pipelining).
    parameter_reads, reads, writes = disk_traffic(stats, plan, accumulate=inputs.accumulate)
    read, write = inputs.disk.read_gbps * 1e9, inputs.disk.write_gbps * 1e9
    under_compute = max(compute, weights_in + offload, parameter_reads / read)
    on_disk = under_compute - max(compute, weights_in + offload) + reads / read + writes / write
    return StepTime(compute, weights_in + gradients_out + offload, optimizer, total + on_disk, on_disk,
                    parameter_reads + reads, writes)


def plan_variants(base: Plan, stats: ModelStats, levers: CandidateLevers) -> list[Plan]:
    """State in host memory, and on disk only where the user gave one (never written to uninvited)."""
    devices = [levers.offload_device] if levers.offload_device else ["cpu", "nvme"] if levers.disk_given else ["cpu"]
    states = [levers.nvme_state] if levers.nvme_state else list(NVME_STATES)
    return [dataclasses.replace(base, offload_device=device, nvme_state=state)
            for device in devices for state in (states if device == "nvme" else ["all"])]


# What DeepSpeed writes into its model file beside the client state (Lightning's).
_ENGINE_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                "checkpoint_parallel_dimensions", "ds_config", "ds_version")


def client_state(path: Path, *, weights_only: bool | None = False) -> dict[str, Any]:
    """Lightning's state (loops, callbacks, hyperparameters) in a checkpoint folder: rank 0's model file, less
    DeepSpeed's own keys."""
    state = torch.load(_model_file(path), map_location="cpu", weights_only=weights_only)
    return {key: value for key, value in state.items() if key not in _ENGINE_KEYS}


def _model_file(path: Path) -> Path:
    tag = (path / "latest").read_text().strip()
    return sorted((path / tag).glob("*_rank_0_*model_states.pt"))[0]


def _saved_buffers(path: Path) -> dict[str, torch.Tensor]:
    """The module's persistent buffers in rank 0's model file, each in the dtype it was saved in: DeepSpeed's own
    reader casts every buffer to fp32 in some versions (0.19.6), an integer count past 2**24 with it."""
    state = torch.load(_model_file(path), map_location="cpu", mmap=True, weights_only=False)
    buffer_names = set(state["buffer_names"])
    return {name: value for name, value in state["module"].items() if name in buffer_names}


def _weights_and_buffers(path: Path) -> dict[str, Any]:
    """Each weight (fp32, gathered from the ranks' partitions when it is reached) and buffer (as saved) by name."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    buffers = _saved_buffers(path)  # read first: the model file is released before DeepSpeed reads the ranks' files
    tensors = get_fp32_state_dict_from_zero_checkpoint(str(path), lazy_mode=True)
    tensors.update(buffers)
    return tensors


def fp32_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each fp32 weight, gathered from the ranks' partitions when it is reached; then each persistent buffer (fp32
    if floating, else in its own dtype)."""
    lazy = _weights_and_buffers(path)
    # A tied weight is gathered once and kept until its last name, so every name shares one tensor.
    names_left = Counter(id(value) for value in lazy.values())
    tied: dict[int, torch.Tensor] = {}
    for name, value in lazy.items():
        tensor = tied.pop(id(value), None)
        if tensor is None:
            tensor = value if isinstance(value, torch.Tensor) else value.contiguous()
            tensor = tensor.float() if tensor.is_floating_point() else tensor
        names_left[id(value)] -= 1
        if names_left[id(value)]:
            tied[id(value)] = tensor
        yield name, tensor
        del tensor


def saved_weights(path: Path) -> list[SavedTensor]:
    """Each fp32 weight, gathered from the ranks' partitions when it is loaded, and each buffer as saved."""
    return grouped(_weights_and_buffers(path).items(), key=id)


SPEC = BackendSpec(
    name="deepspeed", engine=DeepSpeedBackend, memory_terms=memory_terms, step_time=step_time,
    checkpoint_weight_bytes=2 + 4,  # its bf16 partitions beside the fp32 master weights
    exact_optimizer="cpu_adam",
    pinned_optimizer=lambda optimizer: None if optimizer == "paged_adamw8bit" else optimizer,
    plan_variants=plan_variants, keeps_state_on_disk=True,
    options_of=lambda plan: {"offload_device": plan.offload_device, "nvme_state": plan.nvme_state},
    pinned_levers=("nvme_path", "offload_device", "nvme_state"),
    multi_process=MultiProcess(shards_state=True), checkpoint_files=("latest",), fp32_tensors=fp32_tensors,
    saved_weights=saved_weights, client_state=client_state,
)
