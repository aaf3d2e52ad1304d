"""`from_pretrained_refused()`: transformers' `PreTrainedModel.from_pretrained` raises while the `stream` backend
builds the model's parameters on the meta device, where the weights it loaded would be dropped.

It costs nothing to a model that does not use transformers: transformers' modeling code, which takes seconds to
import, is not imported for it. The refusal is installed at once where `transformers.modeling_utils` is imported
already, else as that module's import (by `configure_model`) finishes, by a finder on `sys.meta_path` meanwhile.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, NoReturn

MODELING_UTILS = "transformers.modeling_utils"  # defines `PreTrainedModel`


@contextmanager
def from_pretrained_refused() -> Iterator[None]:
    """`PreTrainedModel.from_pretrained` raises inside, whether transformers was imported before or inside; on
    exit (an exception's too) `from_pretrained` and `sys.meta_path` are as they were."""
    refusal = _FromPretrainedRefusal()
    modeling_utils = sys.modules.get(MODELING_UTILS)
    if modeling_utils is not None:
        refusal.install(modeling_utils)
    else:
        sys.meta_path.insert(0, refusal)
    try:
        yield
    finally:
        if refusal in sys.meta_path:
            sys.meta_path.remove(refusal)
        refusal.undo()


def _refuse(cls: type, *args: Any, **kwargs: Any) -> NoReturn:
    raise ValueError(
        "`from_pretrained` in `configure_model` cannot load weights while the `stream` backend builds the model's "
        "parameters on the meta device. Call `lightning_offload.pretrained(path)` instead (it reads each weight "
        "straight into the place the streaming plan keeps it), or pass `build_on_meta=False` to build the model in "
        "host memory first."
    )


class _FromPretrainedRefusal(MetaPathFinder):
    """Replaces `PreTrainedModel.from_pretrained` by `_refuse` until `undo()`. While on `sys.meta_path`, it does so
    as the import of `transformers.modeling_utils` finishes, by wrapping that one import's loader."""

    def __init__(self) -> None:
        self._replaced: list[tuple[type, Any]] = []  # (PreTrainedModel, its own `from_pretrained`), in order

    def install(self, modeling_utils: ModuleType) -> None:
        model_class = modeling_utils.PreTrainedModel
        self._replaced.append((model_class, model_class.__dict__["from_pretrained"]))
        model_class.from_pretrained = classmethod(_refuse)

    def undo(self) -> None:
        while self._replaced:
            model_class, original = self._replaced.pop()
            model_class.from_pretrained = original

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != MODELING_UTILS:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find_spec = getattr(finder, "find_spec", None)  # a legacy finder has only `find_module`
            spec = None if find_spec is None else find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _InstallAfterLoading(spec.loader, self)
                return spec
        return None


class _InstallAfterLoading(Loader):
    """Loads a module with `loader`, then installs `refusal` on it."""

    def __init__(self, loader: Loader, refusal: _FromPretrainedRefusal) -> None:
        self._loader, self._refusal = loader, refusal

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its own loader (`importlib.reload` and source lookups use it), not this one-import wrapper.
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._refusal.install(module)
