"""Building the user's model with its parameters on the meta device and its buffers computed for real.

Under `torch.device("meta")` a module's constructor computes its buffers (rotary frequencies, a causal mask, a cached
table) on meta too, and only an initialiser that recomputes them could bring them back. Here, as in accelerate's
`init_empty_weights`, each parameter moves to meta as it is registered while everything else is built in host memory:
buffers come out as under `strategy="auto"`.

Each parameter's initial weights are recorded rather than kept (as torchdistx's deferred init does): every in-place
operation that writes into it during the build (`reset_parameters`, `torch.nn.init`, transformers' `_init_weights`,
`weight.data[0].zero_()`) is run once on a scratch tensor, so the global random generator advances exactly as under
`strategy="auto"`, and logged with the generator's state before it. `InitRecord.read_into` replays the log where the
parameter gets its memory: the same numbers `auto` draws, while the host never holds the whole model. A buffer computed
from parameters (`weight.norm(dim=1)`) gets a record of that computation. What the build cannot know (numbers drawn
like a meta tensor, `torch.randn_like(weight)`) leaves its module to its initialiser.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from lightning_offload.backends.init_functions import InitFunction, wrapped_init_functions

_IN_PLACE_OPERATORS = re.compile(r"__i(add|sub|mul|truediv|floordiv|mod|pow|and|or|xor|lshift|rshift|matmul)__")
_UNINITIALISED = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
# Operations whose result holds their input's values (in another dtype or place): a model's `.to(torch.bfloat16)`.
_SAME_VALUES = frozenset({"to", "type", "bfloat16", "half", "float", "double", "cpu", "cuda", "clone", "detach",
                          "contiguous"})
# Operations that draw a new tensor shaped like a meta one: under meta they draw nothing, so their numbers are unknown.
_DRAWN_LIKE = frozenset({"rand_like", "randn_like", "randint_like", "normal", "bernoulli", "multinomial", "poisson",
                         "dropout", "rrelu"})
# What one evaluation of recorded values has read: a recorded tensor at a step, a computation (`_read_once`).
_VALUES_READ: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar("values_read", default=None)
# Replays run in threads, each step with a generator of its own; one that only takes the global generator holds this.
_GLOBAL_GENERATOR = threading.Lock()
# The attribute a meta parameter carries its record under, until the backend that materialises it replays it.
_RECORD = "_lightning_offload_init_record"


class _Target:
    """Where a logged operation's written tensor goes in its arguments."""


_TARGET = _Target()


class _NotKnown(Exception):
    """An operation's argument that the build cannot compute later (drawn from an unrecorded meta tensor)."""


@dataclass
class _WeightsAt:
    """A recorded tensor's values at one point of the build (as a view of them): `weight` in `weight.norm(dim=1)`."""

    record: InitRecord
    steps: int
    view: tuple[torch.Size, tuple[int, ...], int]

    def evaluate(self) -> torch.Tensor:
        return _read_once((id(self.record), self.steps), lambda: self.record.value(self.steps)).as_strided(*self.view)


@dataclass
class _Computed:
    """A meta tensor the build computed from recorded ones: `weight.norm(dim=1)`."""

    func: Any
    args: tuple
    kwargs: dict

    def evaluate(self) -> Any:
        def compute() -> Any:
            args, kwargs = _evaluated((self.args, self.kwargs))
            return self.func(*args, **kwargs)

        return _read_once(id(self), compute)


def _read_once(key: Any, compute: Callable[[], Any]) -> Any:
    """`compute()`, once per outermost evaluation: what the build computed from recorded values is a graph whose
    nodes several later ones read (spectral norm's power iteration reads each vector twice), not a tree."""
    read = _VALUES_READ.get()
    outermost = _VALUES_READ.set({}) if read is None else None
    try:
        read = _VALUES_READ.get()
        if key not in read:
            read[key] = compute()
        return read[key]
    finally:
        if outermost is not None:
            _VALUES_READ.reset(outermost)


def _evaluated(tree: Any, target: torch.Tensor | None = None) -> Any:
    return pytree.tree_map_only((_Target, _WeightsAt, _Computed),
                                lambda leaf: target if isinstance(leaf, _Target) else leaf.evaluate(), tree)


@dataclass
class _Step:
    func: Any
    view: tuple[torch.Size, tuple[int, ...], int]
    """The written tensor as a view of the parameter: size, stride, storage offset."""
    dtype: torch.dtype
    device: torch.device
    args: tuple
    kwargs: dict
    random_state: torch.Tensor | None
    """The generator's state before the step, for a step that drew random numbers."""

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device, self.dtype)
        target = value.as_strided(*self.view)
        args, kwargs = _evaluated((self.args, self.kwargs), target)
        if self.random_state is None:
            self.func(*args, **kwargs)
            return value
        generator = torch.Generator(self.device)
        generator.set_state(self.random_state)
        try:
            self.func(*args, **{**kwargs, "generator": generator})
        except TypeError:  # an operation that only draws from the global generator
            with _GLOBAL_GENERATOR, torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                _set_random_state(self.device, self.random_state)
                self.func(*args, **kwargs)
        return value


def _converted(tensor: torch.Tensor) -> None:
    """A logged step that only moves the weights to its dtype and device (`module.to(torch.bfloat16)`)."""


def _conversion_to(value: torch.Tensor, device: torch.device) -> _Step:
    """The step that converts the weights to `value`'s dtype (and to its device, unless on meta: `device`)."""
    contiguous = (value.shape, torch.empty(value.shape, device="meta").stride(), 0)
    return _Step(_converted, contiguous, value.dtype, device if value.is_meta else value.device, (_TARGET,), {}, None)


@dataclass
class InitRecord:
    """How a parameter built on meta got its initial weights under `strategy="auto"`: the value it was registered
    with (None: `torch.empty`'s) and the operations that wrote into it after."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    initial: torch.Tensor | None
    steps: list[_Step] = field(default_factory=list)
    complete: bool = True
    """False once an operation wrote a value the build could not know (computed from another meta tensor)."""

    def value(self, steps: int | None = None) -> torch.Tensor:
        """The weights after the first `steps` steps (all by default)."""
        value = (torch.empty(self.shape, dtype=self.dtype, device=self.device) if self.initial is None
                 else self.initial.to(self.device, copy=bool(self.steps)))  # the steps write in place
        for step in self.steps[:steps]:
            value = step.apply(value)
        return value

    def read_into(self, target: torch.Tensor) -> None:
        with torch.no_grad():
            target.copy_(self.value())


def init_record(param: torch.Tensor) -> InitRecord | None:
    """The complete record `parameters_on_meta` left on a meta parameter, for the backend that materialises it."""
    record = getattr(param, _RECORD, None)
    return record if record is not None and record.complete else None


@contextmanager
def parameters_on_meta(record: bool = True) -> Iterator[None]:
    """Inside, every parameter a module registers moves to the meta device (its class, attributes and `requires_grad`
    kept, its host memory never touched); the buffers are computed in host memory by their constructors.

    `record`: each parameter gets an `InitRecord` of its initial weights, and random numbers are drawn as under
    `strategy="auto"` (the global generator leaves the build where `auto`'s build leaves it). Else no number drawn
    survives the build (the generators leave it as they entered), and a buffer drawn at random stays on meta for its
    module's initialiser, as the weights do.
    """
    build = _Build(record)
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    deepcopy_parameter = nn.Parameter.__deepcopy__

    def register_parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None and param.is_meta:
            build.adopt(param)
        elif param is not None and not param.is_meta:
            on_meta = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
            on_meta.__dict__.update(param.__dict__)
            if record:
                build.record(on_meta, param.device, build.initial_value(param))
            module._parameters[name] = on_meta

    def register_buffer_seen(module: nn.Module, name: str, tensor: torch.Tensor | None,
                             persistent: bool = True) -> None:
        register_buffer(module, name, tensor, persistent)
        build.modules.add(module)

    def deepcopy_on_meta(param: nn.Parameter, memo: dict) -> nn.Parameter:
        # A module's copy (`nn.TransformerEncoder` clones its layer) holds the weights of the one it copies.
        copied = deepcopy_parameter(param, memo)
        build.adopt(copied)
        return copied

    nn.Module.register_parameter = register_parameter_on_meta  # type: ignore[method-assign]
    nn.Module.register_buffer = register_buffer_seen  # type: ignore[method-assign]
    nn.Parameter.__deepcopy__ = deepcopy_on_meta  # type: ignore[method-assign]
    try:
        with build, wrapped_init_functions(build.logged_whole) if record else nullcontext():
            yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
        nn.Parameter.__deepcopy__ = deepcopy_parameter  # type: ignore[method-assign]
    build.leave_unknown_buffers_on_meta()


class _Build(TorchFunctionMode):
    """Runs an operation that reads a meta tensor on meta, and logs one that writes into a parameter's weights; one
    that would write a meta value into a host tensor is not run, its host tensor left for meta, with a record of what
    it would have computed."""

    def __init__(self, record: bool) -> None:
        super().__init__()
        self.recording = record
        self.modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.unknown: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.records: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """A meta parameter's storage (shared by its views and `.data`) -> its `InitRecord`."""
        self.uninitialised: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """Host storages `torch.empty` made that nothing wrote into yet."""
        self.same_values: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """The storages of meta tensors holding a parameter's values (`param.to(torch.bfloat16)`) -> its
        `InitRecord`."""
        self.computed: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """Meta tensors computed from recorded ones -> how (`_Computed`)."""
        self.computed_storages: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """Their storages -> (shape, how): a parameter made of one (`Parameter(weight.norm(dim=1))`) shares it."""

    def record(self, param: nn.Parameter, device: torch.device, initial: torch.Tensor | None) -> None:
        # Kept in host memory until the weights get theirs: a GPU-built model's values must not hold the GPU.
        record = InitRecord(param.shape, param.dtype, device, None if initial is None else initial.cpu())
        setattr(param, _RECORD, record)
        self.records[param.untyped_storage()] = record

    def record_computed(self, tensor: torch.Tensor, how: _Computed | None = None) -> InitRecord:
        """A meta buffer or parameter computed from parameters' weights (`weight.norm(dim=1)`, `how`; default: as the
        build saw it computed) gets the record of that."""
        record = InitRecord(tensor.shape, tensor.dtype, torch.get_default_device(), None)
        contiguous = (tensor.shape, tensor.stride(), tensor.storage_offset())
        record.steps.append(_Step(torch.Tensor.copy_, contiguous, tensor.dtype, record.device,
                                  (_TARGET, how or self.computed[tensor]), {}, None))
        setattr(tensor, _RECORD, record)
        return record

    def logged_whole(self, init_function: InitFunction) -> InitFunction:
        """`torch.nn.init`'s functions on a parameter are logged as one step: `orthogonal_` draws into a tensor of
        its own before writing the parameter, which a step per operation could not replay."""

        @functools.wraps(init_function)
        def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            record = self._record_of(tensor) if tensor.is_meta else None
            if record is None:
                return init_function(tensor, *args, **kwargs)
            self._log(record, init_function, tensor, (tensor, *args), kwargs)
            return tensor

        return initialise

    def initial_value(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if _storage(tensor) in self.uninitialised:
            return None
        return tensor.detach()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__set__" and getattr(func, "__self__", None) is torch._C.TensorBase.__dict__["data"]:
            return self._set_data(func, *args)
        written = _written(func, args, kwargs)
        record = self._record_of(written) if written is not None and written.is_meta else None
        if record is not None:
            self._log(record, func, written, args, kwargs)
        if any(isinstance(t, torch.Tensor) and self._is_unknown(t) for t in pytree.tree_leaves((args, kwargs))):
            if written is not None and not written.is_meta:
                # A host tensor (a buffer) written from parameters' weights: left on meta, with its record.
                if self.recording:
                    record = self._record_of(written)
                    if record is None and _storage(written) is not None:
                        record = InitRecord(written.shape, written.dtype, written.device, written.detach().clone())
                        self.records[written.untyped_storage()] = record
                    if record is not None:
                        self._log(record, func, written, args, kwargs)
                self.unknown[written] = True
                return written
            try:
                how = None if name in _DRAWN_LIKE | _UNINITIALISED else _Computed(func, *self._spec((args, kwargs),
                                                                                                   None))
            except _NotKnown:
                how = None
            args, kwargs = pytree.tree_map_only(torch.Tensor, self._on_meta, (args, kwargs))
            result = func(*args, **kwargs)
            if self.recording and name in _UNINITIALISED and isinstance(result, torch.Tensor):
                # Shaped like a meta tensor (`weight.new_empty(rows)`): what is written into it is recorded, and
                # drawn as auto draws it, as for a parameter.
                record = InitRecord(result.shape, result.dtype, torch.get_default_device(), None)
                self.records[result.untyped_storage()] = record
                setattr(result, _RECORD, record)
            source = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].is_meta else None
            source_record = self._record_of(source) if source is not None else None
            if name in _SAME_VALUES and source_record is not None and isinstance(result, torch.Tensor):
                self.same_values[result.untyped_storage()] = source_record
            if how is not None and isinstance(result, torch.Tensor):
                self.computed[result] = how
                self.computed_storages[result.untyped_storage()] = (result.shape, how)
            return result
        random_state = None if self.recording else torch.get_rng_state()
        result = func(*args, **kwargs)
        if random_state is not None and not torch.equal(random_state, torch.get_rng_state()):
            torch.set_rng_state(random_state)
            for tensor in [written] if written is not None else pytree.tree_leaves(result):
                if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                    self.unknown[tensor] = True
        if written is not None:
            if (storage := _storage(written)) is not None:
                self.uninitialised.pop(storage, None)
        elif name in _UNINITIALISED and isinstance(result, torch.Tensor) and (storage := _storage(result)) is not None:
            self.uninitialised[storage] = True
        return result

    def _log(self, record: InitRecord, func: Any, written: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Runs the operation on a scratch copy of the tensor (drawing what `auto` draws) and logs it."""
        try:
            logged_args, logged_kwargs = self._spec((args, kwargs), written)
        except _NotKnown:
            record.complete = False
            return
        device = record.device
        scratch = torch.empty(record.shape, dtype=written.dtype, device=device)
        view = (written.size(), written.stride(), written.storage_offset())
        run_args, run_kwargs = _evaluated((logged_args, logged_kwargs), scratch.as_strided(*view))
        generator = run_kwargs.get("generator")  # the user's own, else the global one
        state = generator.get_state() if generator is not None else _random_state(device)
        func(*run_args, **run_kwargs)
        drew = not torch.equal(state, generator.get_state() if generator is not None else _random_state(device))
        if record.complete:
            logged_kwargs.pop("generator", None)
            record.steps.append(_Step(func, view, written.dtype, device, logged_args, logged_kwargs,
                                      state if drew else None))

    def _spec(self, tree: Any, written: torch.Tensor | None) -> Any:
        """`tree` with each tensor replaced by how to compute it later: the written one by `_TARGET`, a recorded
        one by its values at this point, a host one by a copy; `_NotKnown` for one the build cannot know."""

        def spec(tensor: torch.Tensor) -> Any:
            if tensor is written:
                return _TARGET
            record = self._record_of(tensor)
            if record is not None:
                if not record.complete:
                    raise _NotKnown
                return _WeightsAt(record, len(record.steps),
                                  (tensor.size(), tensor.stride(), tensor.storage_offset()))
            if tensor in self.computed:
                return self.computed[tensor]
            if self._is_unknown(tensor):
                raise _NotKnown
            return tensor.clone()

        return pytree.tree_map_only(torch.Tensor, spec, tree)

    def _set_data(self, func: Any, param: torch.Tensor, value: torch.Tensor) -> None:
        """`param.data = value`: the parameter's record follows its new storage."""
        record = self._record_of(param) if param.is_meta else None
        if record is not None:
            storage = _storage(value) if value.is_meta else None
            taken = None if storage is None else self.records.get(storage)
            whole = value.storage_offset() == 0 and value.is_contiguous()
            if storage is not None and self.same_values.get(storage) is record and value.shape == record.shape:
                record.steps.append(_conversion_to(value, record.device))
            elif taken is not None and taken is not record and whole and value.shape == taken.shape:
                record = taken  # another parameter's weights, whole (transformers' resized embedding)
            elif not value.is_meta and not self._is_unknown(value):
                initial = self.initial_value(value)
                record.initial, record.steps = initial, []
                record.shape, record.dtype = value.shape, value.dtype
                record.device = value.device
            else:
                record.complete = False
        func(param, self._on_meta(value))
        if record is not None:
            self.records[param.untyped_storage()] = record
            setattr(param, _RECORD, record)

    def adopt(self, param: nn.Parameter) -> None:
        """A meta parameter made outside the build's view: one of a recorded parameter's weights
        (`nn.Parameter(p.data)`) shares its record, one of their copy (`nn.Parameter(p.data.to(torch.float32))`, as
        peft upcasts its adapters; a deep copy) gets a copy of the record with the conversion, one computed from them
        (weight norm's magnitude) the record of that computation, and an empty one made on meta a record of its own."""
        if not self.recording or not param.is_meta or init_record(param) is not None:
            return
        storage = _storage(param)
        record = None if storage is None else self.records.get(storage)
        if record is None and storage is not None:
            source = self.same_values.get(storage)
            shape, how = self.computed_storages.get(storage, (None, None))
            if source is not None and source.shape == param.shape:
                record = replace(source, steps=[*source.steps, _conversion_to(param, source.device)])
            elif how is not None and shape == param.shape:
                record = self.record_computed(param, how)
            elif storage in self.uninitialised:
                # Made on meta by name (`nn.Embedding(..., device=weight.device)`, as transformers resizes one):
                # under auto it is made where the others are, and its initialiser draws there.
                record = InitRecord(param.shape, param.dtype, torch.get_default_device(), None)
            else:
                return
            self.records[storage] = record
        setattr(param, _RECORD, record)

    def _record_of(self, tensor: torch.Tensor) -> InitRecord | None:
        storage = _storage(tensor)
        return None if storage is None else self.records.get(storage)

    def _is_unknown(self, tensor: torch.Tensor) -> bool:
        return tensor.is_meta or tensor in self.unknown

    def _on_meta(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_meta else tensor.to("meta")

    def leave_unknown_buffers_on_meta(self) -> None:
        for module in self.modules:
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer in self.computed:
                    self.record_computed(buffer)
                elif buffer is not None and buffer in self.unknown:
                    on_meta = torch.empty_like(buffer, device="meta")
                    setattr(on_meta, _RECORD, self._record_of(buffer))
                    module._buffers[name] = on_meta


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The storage a tensor's views share; None for a layout without one (sparse)."""
    try:
        return tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None


def _random_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_random_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _written(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor an in-place operation (or one given `out=`) writes into."""
    name = getattr(func, "__name__", "")
    in_place = (name.endswith("_") and not name.startswith("_")) or name == "__setitem__" or \
        _IN_PLACE_OPERATORS.fullmatch(name) is not None
    if in_place and args and isinstance(args[0], torch.Tensor):
        return args[0]
    out = kwargs.get("out")
    return out if isinstance(out, torch.Tensor) else None
