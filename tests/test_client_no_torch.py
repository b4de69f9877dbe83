"""The client library and CLI import with torch (and the esmc library) unavailable."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

BLOCKED = ("torch", "esmc", "esmc_server")

SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError("blocked in this test: " + name)
            return None

    sys.meta_path.insert(0, Blocker())
    import esmc_client
    import esmc_client.cli
    from esmc_client import AsyncESMCClient, ESMCClient, LogitsConfig

    client = ESMCClient("127.0.0.1:1")
    client.close()
    assert esmc_client.cli.main(["serve"]) == 2  # a clear error, not a traceback
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("loaded:", loaded)
    """
)


def test_client_imports_without_torch():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout
    assert "esmc serve needs the server extra" in result.stderr


def test_blocker_really_blocks_torch():
    script = SCRIPT.format(blocked=BLOCKED) + "\nimport torch\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "blocked in this test: torch" in result.stderr
