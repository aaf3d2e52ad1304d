"""`wrapped_init_functions`: `torch.nn.init` as the engines see it while the user's model is built."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import activation

from lightning_offload.backends.init_functions import wrapped_init_functions


def test_functions_imported_by_name_are_wrapped_too_and_restored_after() -> None:
    calls = []

    def counting(function):
        def initialise(tensor, *args, **kwargs):
            calls.append(function.__name__)
            return function(tensor, *args, **kwargs)

        return initialise

    original = activation.constant_  # `from torch.nn.init import constant_`, as nn.MultiheadAttention's module does
    with wrapped_init_functions(counting):
        assert activation.constant_ is not original
        nn.MultiheadAttention(8, 2)
    assert activation.constant_ is original and torch.nn.init.constant_ is original
    # MultiheadAttention initialises through the names its module imported: each call went through the wrapper.
    assert calls.count("xavier_uniform_") == 1 and calls.count("constant_") == 2
