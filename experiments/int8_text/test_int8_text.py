"""experiments/int8_text/int8_text.py, behind RESULTS.md's figures for an int8 text graph."""

import importlib.util
import os
import re

from tiny import make_checkpoint

import export

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_text.py")
_spec = importlib.util.spec_from_file_location("int8_text", _path)
int8_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(int8_text)


def test_every_variant_is_measured_against_the_fp32_graph(tiny_data, tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "best.pt", os.path.join(tiny_data, "text_encoder"), 0,
                         querybank=True, data_dir=tiny_data)
    assert export.main(["--checkpoint", ck]) == 0
    int8_text.main(["--checkpoint", ck, "--data_dir", tiny_data])
    rows = [line for line in capsys.readouterr().out.splitlines() if " MB " in line]
    assert len(rows) == 1 + len(int8_text.VARIANTS)
    cos = [float(re.search(r"cos min (\S+)", row).group(1)) for row in rows]
    assert cos[0] == 1.0 and all(0 < c < 1 for c in cos[1:])  # int8 is not the fp32 graph
    mb = [float(row.split(" MB")[0].split()[-1]) for row in rows]
    assert mb[2] > mb[3]  # the embedding table in int8 is the smaller file
