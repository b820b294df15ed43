import platform

import pytest

from drpruning.training.cpu_memory import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning applies to glibc only")
def test_keep_freed_memory_applies_once_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
