"""A teacher only stage one may import: the trainer test asserts it never enters `sys.modules`."""

from __future__ import annotations

from tests.toy_models import ToyNet


class IsolatedTeacher(ToyNet):
    """ToyNet under another module name, so its import is visible on its own."""
