"""The one-writer lock on S3: two real processes race for it through moto's conditional PUT."""

from __future__ import annotations

import pytest

from tests.storage.test_lock import race_two_processes

pytestmark = pytest.mark.s3


def test_racing_acquire_on_s3_backs_off_with_locked_error(s3_url):
    race_two_processes(s3_url, rounds=1, blind_rounds=1)
