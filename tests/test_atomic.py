import os
import subprocess
import sys

import pytest

from helpers.atomic import atomic_path, atomic_write


def test_atomic_write_replaces_the_file_on_success(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with atomic_write(str(path), newline="", encoding="utf-8") as f:
        f.write("new\r\n")
        assert path.read_text() == "old\n"  # nothing visible until the block ends
    assert path.read_bytes() == b"new\r\n" and os.listdir(tmp_path) == ["out.csv"]


@pytest.mark.parametrize("error", [ValueError("bad row"), KeyboardInterrupt()])
def test_atomic_write_keeps_the_old_file_on_an_error(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(str(path)) as f:
            f.write("half a fi")
            raise error
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_atomic_path_for_writers_that_take_a_path(tmp_path):
    path = tmp_path / "new.bin"
    with atomic_path(str(path)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename stays on one filesystem
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and os.listdir(tmp_path) == ["new.bin"]
    with pytest.raises(OSError):
        with atomic_path(str(tmp_path / "never.bin")) as tmp:
            open(tmp, "wb").close()
            raise OSError("disk full")
    assert os.listdir(tmp_path) == ["new.bin"]  # no file, no temporary left


def test_two_processes_writing_one_file_use_their_own_temporary(tmp_path):
    path = str(tmp_path / "index.pt")
    with atomic_path(path) as mine:
        assert mine == f"{path}.{os.getpid()}.tmp"
        other = subprocess.run([sys.executable, "-c", "import os, sys; from helpers.atomic import atomic_path\n"
                                f"with atomic_path({path!r}) as t: open(t, 'w').write('theirs'); print(t)"],
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               capture_output=True, text=True, check=True).stdout.strip()
        assert other != mine
        with open(mine, "w") as f:
            f.write("mine")
    assert open(path).read() == "mine" and os.listdir(tmp_path) == ["index.pt"]
