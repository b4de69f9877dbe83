"""The esmc CLI without a server: argument parsing, FASTA reading, output files."""

import numpy as np
import pytest

from esmc_client import EmbedResult, ResponseMetadata
from esmc_client.cli import build_parser, main, top_tokens_lines, write_embeddings
from esmc_client.fasta import read_fasta

pytestmark = pytest.mark.unit


def test_generate_arguments():
    args = build_parser("h:1").parse_args(
        ["generate", "MKT___LL__", "--steps", "8", "--strategy", "entropy", "--temperature", "0",
         "--schedule", "linear", "--seed", "3", "--no-annealing", "--stream"]
    )
    assert (args.prompt, args.steps, args.strategy, args.schedule) == ("MKT___LL__", 8, "entropy", "linear")
    assert (args.temperature, args.seed, args.annealing, args.stream) == (0.0, 3, False, True)
    assert args.target == "h:1" and args.top_p == 1.0 and args.timeout is None


def test_generate_defaults_follow_the_reference():
    args = build_parser().parse_args(["generate", "M_"])
    assert (args.steps, args.strategy, args.schedule, args.annealing) == (20, "random", "cosine", True)
    assert args.target == "127.0.0.1:50051" and not args.stream


def test_embed_arguments():
    args = build_parser().parse_args(
        ["embed", "in.fasta", "-o", "out.npz", "--layer", "-2", "--batch-size", "10",
         "--target", "dns:///esmc:50051", "--no-progress"]
    )
    assert str(args.fasta) == "in.fasta" and str(args.output) == "out.npz"
    assert (args.layer, args.batch_size, args.concurrency, args.max_in_flight) == (-2, 10, 4, 64)
    assert args.target == "dns:///esmc:50051" and args.progress is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "in.fasta", "-o", "out.csv"], "the output must end in"),
        (["embed", "in.fasta"], "required: -o/--output"),
        (["generate", "M_", "--steps", "0"], "must be >= 1"),
        (["generate", "M_", "--strategy", "greedy"], "invalid choice"),
        (["logits", "MK", "--dtype", "int8"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_optional_writer_is_named(capsys):
    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["embed", "in.fasta", "-o", "out.h5"])
        assert "needs h5py" in capsys.readouterr().err
    else:
        args = build_parser().parse_args(["embed", "in.fasta", "-o", "out.h5"])
        assert args.output.suffix == ".h5"


def test_target_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("ESMC_TARGET", "127.0.0.1:1")  # nothing listens there
    assert main(["info", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("esmc info: UNAVAILABLE") or err.startswith("esmc info: DEADLINE_EXCEEDED")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


def test_read_fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text(
        ">sp|P1|ONE first protein\nmktay\nIAKQ*\n\n; a comment\n>two\nLL<mask>V\n>empty\n>three x\nM K T\n"
    )
    assert list(read_fasta(path)) == [
        ("sp|P1|ONE", "MKTAYIAKQ"), ("two", "LL<mask>V"), ("empty", ""), ("three", "MKT"),
    ]


def test_read_fasta_rejects_text_before_a_header(tmp_path):
    path = tmp_path / "bad.fasta"
    path.write_text("\nMKT\n>a\nMK\n")
    with pytest.raises(ValueError, match=r"bad.fasta:2: sequence data before the first"):
        list(read_fasta(path))


def _result(uid, values):
    return EmbedResult(uid, np.float32(values), None, ResponseMetadata())


def test_write_npz_keeps_ids_and_order(tmp_path):
    path = tmp_path / "out.npz"
    write_embeddings(path, [_result("sp|P1|A", [1, 2, 3]), _result("b", [4, 5, 6])])
    with np.load(path) as data:
        assert data["ids"].tolist() == ["sp|P1|A", "b"]
        np.testing.assert_array_equal(data["embeddings"], np.float32([[1, 2, 3], [4, 5, 6]]))
        assert data["embeddings"].dtype == np.float32


def test_write_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "out.h5"
    write_embeddings(path, [_result("a", [1, 2]), _result("b", [3, 4])])
    with h5py.File(path) as handle:
        assert [i.decode() for i in handle["ids"][:]] == ["a", "b"]
        np.testing.assert_array_equal(handle["embeddings"][:], np.float32([[1, 2], [3, 4]]))


def test_write_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "out.parquet"
    write_embeddings(path, [_result("a", [1, 2]), _result("b", [3, 4])])
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("embedding").to_pylist() == [[1.0, 2.0], [3.0, 4.0]]


def test_top_tokens_lines():
    vocabulary = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A"]
    logits = np.full((3, 8), -10.0, dtype=np.float32)
    logits[0, 0] = 10.0
    logits[1, [4, 5]] = [2.0, 1.0]
    logits[2, 7] = 10.0  # an id past the vocabulary
    lines = top_tokens_lines(logits, np.array([0, 4, 2]), vocabulary, k=2)
    assert lines[0].split()[:3] == ["0", "<cls>", "<cls>"]
    fields = lines[1].split()
    assert fields[:3] == ["1", "L", "L"] and fields[4] == "A"
    p_l, p_a = float(fields[3]), float(fields[5])
    assert p_l == pytest.approx(np.e / (np.e + 1), abs=1e-3)
    assert p_a == pytest.approx(1 / (np.e + 1), abs=1e-3)
    assert lines[2].split()[2] == "<7>"
