"""The wire contract changes only compatibly: ``buf lint`` and ``buf breaking`` against the
contract as last released (protos/released), run with the buf CLI that ``npm ci --prefix
tools`` installs (tools/package.json pins it).

Other teams compile against protos/esmc/v1/esmc.proto: field numbers and names are never reused
or retyped, nothing is removed without a reserved entry, no RPC or service disappears.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"
PROTO = Path("esmc") / "v1" / "esmc.proto"
RELEASED = Path("released") / "esmc" / "v1" / "esmc.proto"


def _buf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert BUF.exists(), f"{BUF} is missing: run `npm ci --prefix tools`"
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _breaking(protos: Path) -> subprocess.CompletedProcess:
    # the released copy lies inside the module: it is read as a file of its own (no config)
    return _buf(
        "breaking", ".", "--against", str(RELEASED), "--against-config", '{"version":"v2"}',
        cwd=protos,
    )


def _copy(tmp_path: Path) -> Path:
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos, ignore=shutil.ignore_patterns("esmc_proto"))
    return protos


def test_the_contract_passes_lint():
    result = _buf("lint", ".", cwd=ROOT / "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_contract_is_compatible_with_the_last_release():
    result = _breaking(ROOT / "protos")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        # a field renumbered: old clients write the id where the server no longer reads it
        (lambda t: t.replace("string id = 1;", "string id = 99;", 1), 'with name "id"'),
        # a field retyped
        (lambda t: t.replace("string id = 1;", "int64 id = 1;", 1), 'changed type from "string"'),
        # an RPC removed
        (lambda t: re.sub(r"\n\s*rpc Decode\([^;]*;", "\n", t, count=1), 'RPC "Decode"'),
    ],
    ids=["renumbered", "retyped", "rpc-removed"],
)
def test_an_incompatible_change_is_refused(tmp_path, edit, complaint):
    protos = _copy(tmp_path)
    path = protos / PROTO
    before = path.read_text()
    path.write_text(edit(before))
    assert path.read_text() != before
    result = _breaking(protos)
    assert result.returncode != 0
    assert complaint in result.stdout, result.stdout + result.stderr


def test_a_new_optional_field_is_compatible(tmp_path):
    protos = _copy(tmp_path)
    path = protos / PROTO
    text = path.read_text()
    text = re.sub(r"(message InfoRequest \{)", r"\1\n  string added_for_the_test = 1000;", text)
    path.write_text(text)
    assert "added_for_the_test" in path.read_text()
    result = _breaking(protos)
    assert result.returncode == 0, result.stdout + result.stderr
