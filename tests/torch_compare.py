"""Bit-for-bit comparison of nested torch state (state dicts, snapshots)."""

from __future__ import annotations

import torch


def assert_same_tree(actual, expected, where: str = "state") -> None:
    """Equal nested dicts/lists; tensors equal bit for bit, in dtype and shape."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where
