"""Data sets that are wrong in ways a user's own code can be (built by spec in tests/faults)."""

from __future__ import annotations

from tests.toy_models import ToyData


class StringItems(ToyData):
    """Items are text, not tensors or arrays."""

    def __getitem__(self, i: int):
        return f"sample {i}", i % self.num_classes


class WideInputs(ToyData):
    """16 values per input where the toy teacher takes 8."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x.repeat(2), y


class NotIndexable:
    """Has a length but no __getitem__."""

    def __init__(self, **kwargs):
        pass

    def __len__(self) -> int:
        return 10
