import sys

import pytest

from esmc.runtime import keep_freed_memory

pytestmark = pytest.mark.unit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_allocator_keeps_freed_memory_on_linux():
    assert keep_freed_memory() is True
