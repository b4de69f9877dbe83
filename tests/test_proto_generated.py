"""The committed protobuf/gRPC code equals what tools/gen_proto.py generates."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "tools" / "gen_proto.py"
PROTO_PACKAGE = ROOT / "protos" / "esmc_proto" / "v1"

pytestmark = pytest.mark.unit


def _check(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GEN), "--check", *extra], capture_output=True, text=True, cwd=ROOT
    )


def test_committed_generated_code_is_fresh():
    result = _check()
    assert result.returncode == 0, result.stderr


def test_check_fails_on_an_edited_generated_file(tmp_path):
    copy = tmp_path / "v1"
    shutil.copytree(PROTO_PACKAGE, copy)
    assert _check("--out-root", str(copy)).returncode == 0
    edited = copy / "esmc_pb2_grpc.py"
    edited.write_text(edited.read_text() + "\n# edited by hand\n")
    result = _check("--out-root", str(copy))
    assert result.returncode == 1
    assert "esmc_pb2_grpc.py" in result.stderr


def test_check_fails_on_a_missing_generated_file(tmp_path):
    copy = tmp_path / "v1"
    shutil.copytree(PROTO_PACKAGE, copy)
    (copy / "esmc_pb2.pyi").unlink()
    result = _check("--out-root", str(copy))
    assert result.returncode == 1
    assert "esmc_pb2.pyi" in result.stderr
