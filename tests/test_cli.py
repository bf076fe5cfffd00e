"""helpers/cli.py: flag files with comments, and the argparse types that refuse numbers out of range."""

import pytest

from helpers.cli import ArgParser, int_at_least, non_negative_float, non_negative_int, positive_float, positive_int


def parse(kind, text, capsys):
    """(value, None) or (None, argparse's message) for --x text."""
    p = ArgParser(prog="script.py")
    p.add_argument("--x", type=kind)
    try:
        return p.parse_args(["--x", text]).x, None
    except SystemExit as e:
        assert e.code == 2
        return None, capsys.readouterr().err.strip().splitlines()[-1]


# The last column: the type argparse names for text that is no number at all.
@pytest.mark.parametrize("kind, good, bad, name", [
    (positive_int, {"1": 1, "512": 512}, {"0": "must be at least 1, not 0", "-1": "must be at least 1, not -1"},
     "int"),
    (non_negative_int, {"0": 0, "4": 4}, {"-1": "must be at least 0, not -1"}, "int"),
    (int_at_least(-1), {"-1": -1, "2": 2}, {"-2": "must be at least -1, not -2"}, "int"),
    (positive_float, {"0.07": 0.07, "1e-3": 1e-3},
     {"0": "must be a positive number, not 0", "-1": "must be a positive number, not -1",
      "nan": "must be a positive number, not nan", "inf": "must be a positive number, not inf"}, "float"),
    (non_negative_float, {"0": 0.0, "5e-5": 5e-5},
     {"-0.5": "must be a non-negative number, not -0.5", "nan": "must be a non-negative number, not nan",
      "inf": "must be a non-negative number, not inf"}, "float"),
])
def test_types_take_numbers_in_range_and_refuse_the_rest(kind, good, bad, name, capsys):
    for text, value in good.items():
        assert parse(kind, text, capsys) == (value, None)
    for text, message in bad.items():
        assert parse(kind, text, capsys) == (None, f"script.py: error: argument --x: {message}")
    assert parse(kind, "x", capsys) == (None, f"script.py: error: argument --x: invalid {name} value: 'x'")


def test_flag_file_with_comments(tmp_path):
    (tmp_path / "flags.txt").write_text("# a recipe\n--lr 1e-4  # the towers\n\n--n 3\n")
    p = ArgParser(prog="script.py")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--n", type=positive_int, default=1)
    args = p.parse_args([f"@{tmp_path / 'flags.txt'}", "--n", "5"])  # flags after the file win
    assert (args.lr, args.n) == (1e-4, 5)
