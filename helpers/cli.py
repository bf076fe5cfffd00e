"""Command lines of the scripts: flag files and argparse types that refuse numbers out of range.

    python train.py @configs/offline.txt --data_dir data/flickr8k --model_dir models/offline

A type below turns "--batch_size 0" into argparse's usual message and exit status 2:
"train.py: error: argument --batch_size: must be at least 1, not 0".
"""

import argparse
import datetime
import math
import os


class ArgParser(argparse.ArgumentParser):
    """argparse that also reads flags from files given as @path (fromfile_prefix_chars="@")."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars="@", **kwargs)

    def convert_arg_line_to_args(self, line):
        # Flag files (@configs/offline.txt) hold "--flag value" per line and # comments.
        return line.split("#", 1)[0].split()


def _number(convert, ok, needed, name):
    def parse(text):
        value = convert(text)  # a ValueError becomes argparse's "invalid <name> value: 'x'"
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {needed}, not {text}")
        return value
    parse.__name__ = name
    return parse


def int_at_least(low):
    """An argparse type: an integer >= low."""
    return _number(int, lambda v: v >= low, f"at least {low}", "int")


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
# math.inf and nan (every comparison with nan is False) are refused too.
positive_float = _number(float, lambda v: 0 < v < math.inf, "a positive number", "float")
non_negative_float = _number(float, lambda v: 0 <= v < math.inf, "a non-negative number", "float")


def iso_date(text):
    """An argparse type: a calendar date written YYYY-MM-DD."""
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date written YYYY-MM-DD, not {text}")


def usable_cores():
    """The cores this process may run on: os.cpu_count() counts the machine's, and a container or
    `taskset` may allow fewer."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
