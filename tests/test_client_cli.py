"""The esmc CLI without a server: argument parsing, FASTA reading, output files."""

import subprocess
import sys

import numpy as np
import pytest

from esmc_client.cli import build_parser, main
from esmc_client.cli_commands import top_tokens_lines
from esmc_client.fasta import FastaError, read_fasta, residue_count, truncate
from esmc_client.outputs import read_embeddings, write_embeddings
from helpers.data import proteome_path

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
    assert main(["info", "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("esmc info: cannot use the server at 127.0.0.1:1: ")
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err
    assert err.count("\n") == 1


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


def test_read_fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text(
        ">sp|P1|ONE first protein\nmktay\nIAKQ*\n\n; a comment\n>two\nLL<mask>V\n>empty\n>three x\nM K T\n"
    )
    assert list(read_fasta(path)) == [  # case kept: lowercase is the caller's decision
        ("sp|P1|ONE", "mktayIAKQ"), ("two", "LL<mask>V"), ("empty", ""), ("three", "MKT"),
    ]
    assert list(read_fasta(path, uppercase=True))[:2] == [
        ("sp|P1|ONE", "MKTAYIAKQ"), ("two", "LL<mask>V"),
    ]


def test_read_fasta_rejects_text_before_a_header(tmp_path):
    path = tmp_path / "bad.fasta"
    path.write_text("\nMKT\n>a\nMK\n")
    with pytest.raises(FastaError, match=r"bad.fasta:2: sequence data before the first"):
        list(read_fasta(path))


def test_the_library_reads_fasta_as_the_client_does(tmp_path):
    """The library's reader (esmc.fasta; the library may not import the client) gives the
    client's records, on edge cases and the whole proteome; importing the client's reader
    loads neither grpc nor torch."""
    import esmc.fasta
    import esmc_client.fasta

    path = tmp_path / "in.fasta"
    path.write_text(">sp|P1|ONE first\nmktay\nIAKQ*\n\n; note\n>two\nLL<mask>V\n>\n>e\n>x y\nM K\tT*\n")
    for source in (path, proteome_path()):
        assert list(esmc.fasta.read_fasta(source)) == list(esmc_client.fasta.read_fasta(source))
    bad = tmp_path / "bad.fasta"
    bad.write_text("\nMKT\n>a\nMK\n")
    for reader in (esmc.fasta, esmc_client.fasta):
        with pytest.raises(reader.FastaError, match=r"bad.fasta:2: sequence data before the first"):
            list(reader.read_fasta(bad))
    script = ("import sys, esmc_client.fasta; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'torch', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_masks_count_as_one_residue():
    assert residue_count("MK<mask>L") == 4 and truncate("MK<mask>LV", 3) == "MK<mask>"
    assert truncate("MKTLV", 2) == "MK"


# --- output files -------------------------------------------------------------------------

META = {"model": "esmc-tiny", "layer": -2, "pooling": "mean", "dtype": "float16",
        "server_version": "0.1.0", "d_model": 3, "n_layers": 4, "max_residues": 2046}


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".parquet"])
def test_every_format_records_ids_embeddings_and_the_run(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    matrix = np.float32([[1, 2, 3], [4, 5, 6]])
    write_embeddings(path, ["sp|P1|A", "b"], list(matrix), META, [False, True])
    back = read_embeddings(path)
    assert back.ids == ["sp|P1|A", "b"] and back.offsets is None
    np.testing.assert_array_equal(back.embeddings, matrix)
    assert back.embeddings.dtype == np.float32
    assert back.truncated.tolist() == [False, True]
    assert back.metadata == {**META, "format": 1}


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".parquet"])
def test_per_position_embeddings_keep_each_protein_rows(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    first, second = np.arange(12, dtype=np.float32).reshape(4, 3), np.ones((2, 3), np.float32)
    write_embeddings(path, ["a", "b"], [first, second], {**META, "pooling": "none"})
    back = read_embeddings(path)
    assert back.offsets.tolist() == [0, 4, 6] and back.metadata["pooling"] == "none"
    np.testing.assert_array_equal(back[0], first)
    np.testing.assert_array_equal(back[1], second)


def test_npz_keys_are_plain_arrays(tmp_path):
    path = tmp_path / "out.npz"
    write_embeddings(path, ["a"], [np.float32([1, 2, 3])], META)
    with np.load(path) as data:
        assert sorted(data.files) == sorted(
            ["ids", "embeddings", "truncated", *META, "format"])
        assert data["model"].item() == "esmc-tiny" and int(data["layer"]) == -2


# --- help and whole-run errors (no server needed) -----------------------------------------


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("embed", ["(default: -1)", "(default: mean)", "(default: float32)", "(default: embed)",
                   "(default: 256)", "(default: 4)", "(default: 64)", "(default: 30.0)",
                   "ESMC_TARGET", "default: what the server accepts"]),
        ("generate", ["(default: 20)", "(default: random)", "(default: cosine)", "(default: 1.0)",
                      "(default: True)"]),
        ("logits", ["(default: 3)", "(default: float32)"]),
        ("info", ["ESMC_TARGET", "(default: False)"]),
    ],
)
def test_help_shows_defaults(command, shown, capsys, monkeypatch):
    monkeypatch.setenv("ESMC_TOKEN", "s3cret-token")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out, text
    assert "s3cret-token" not in out and "(default: None)" not in out


def _fasta(tmp_path, text: str):
    path = tmp_path / "in.fasta"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "extra", "message"),
    [
        (None, [], "cannot read {missing}: No such file or directory"),
        ("MKTL\nLLV\n", [], "in.fasta:1: sequence data before the first '>' header"),
        ("", [], "no sequences in"),
        (">a\nMK\n>b\nLV\n>a\nMKT\n>b\nL\n", [], "2 ids occur more than once in"),
        (">a\nMK\n>b\nmkTL\n>c\nLLv\n", [], "2 sequences contain lowercase letters (first: b, "
         "'m' at residue 1); ESMC reads upper-case one-letter codes; pass --uppercase"),
    ],
)
def test_input_problems_are_one_line_and_exit_2(tmp_path, capsys, text, extra, message):
    path = tmp_path / "missing.fasta" if text is None else _fasta(tmp_path, text)
    out = tmp_path / "out.npz"
    code = main(["embed", str(path), "-o", str(out), "--target", "127.0.0.1:1", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("esmc embed: ")
    assert message.format(missing=path) in err
    assert not out.exists()


def test_duplicate_ids_are_named(tmp_path, capsys):
    path = _fasta(tmp_path, ">a\nMK\n>b\nLV\n>a\nMKT\n")
    assert main(["embed", str(path), "-o", str(tmp_path / "o.npz"), "--target", "127.0.0.1:1"]) == 2
    assert "1 ids occur more than once in" in capsys.readouterr().err  # "a" named


def test_unreachable_server_is_one_line_without_traceback(tmp_path):
    path = _fasta(tmp_path, "".join(f">p{i}\nMKTLLV\n" for i in range(100)))
    command = [sys.executable, "-m", "esmc_client.cli", "embed", str(path), "-o",
               str(tmp_path / "out.npz"), "--target", "127.0.0.1:1", "--timeout", "10"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("esmc embed: cannot use the server at 127.0.0.1:1: ")


def test_lowercase_prompt_is_refused_with_the_hint(capsys):
    assert main(["generate", "mkt__", "--target", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "the prompt contains lowercase letters ('m' at residue 1)" in err and "--uppercase" in err


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


def test_installed_commands_load_and_are_listed(capsys):
    """esmc serve, ray-embed and ray-score come from the esmc.commands entry points (the
    client imports neither package); each loads to a main(argv) and shows in the help."""
    from esmc_client.cli import installed_commands
    from esmc_ray.cli import ray_embed, ray_score
    from esmc_server.cli import main as serve_main

    commands = installed_commands()
    assert {name: entry.load() for name, entry in commands.items()} == {
        "serve": serve_main, "ray-embed": ray_embed, "ray-score": ray_score,
    }
    assert [commands[n].extras for n in ("serve", "ray-embed")] == [["server"], ["ray"]]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    listed = capsys.readouterr().out
    assert "see esmc serve --help (the [server] extra)" in listed
    assert "see esmc ray-embed --help (the [ray] extra)" in listed
