"""A toy teacher that dies mid-run on one rank, to prove other ranks' shards survive.

The rank comes from torchrun's RANK variable, so the very same command (same kwargs, same
fingerprint) rerun by a single process (rank 0) or with the dying rank gone runs to the end.
"""

from __future__ import annotations

import os
import time

from tests.toy_models import ToyNet


class DyingNet(ToyNet):
    """ToyNet whose rank `die_rank` kills its own process after `die_after` forwards.

    Before dying it waits `grace` seconds, so that its writer thread has committed the shards it
    finished and the other ranks have reached the barrier: the crash then hits a known state.
    """

    def __init__(self, die_rank: int = 1, die_after: int = 3, grace: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.die_rank, self.die_after, self.grace = die_rank, die_after, grace
        self.calls = 0

    def forward(self, x):
        if int(os.environ.get("RANK", "0")) == self.die_rank:
            if self.calls >= self.die_after:
                time.sleep(self.grace)
                os._exit(17)  # no cleanup, no finally: like a segfault or an OOM kill
            self.calls += 1
        return super().forward(x)
