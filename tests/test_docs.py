"""The README says what the code does: flag defaults, commands that parse, and run.sh's modes.

Flag tables: a row `| `--flag` | default | meaning |` under the nearest heading that names a script
(`### train.py`, `## Data: preprocess_flickr8k.py`) states that script's argparse default. The
default cell is a number, a backticked string, several numbers (`nargs`), or one of WORDS.
run.sh runs with PYTHON set to a stub that logs each call, so no script really runs.
"""

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["preprocess_flickr8k", "train", "evaluate", "search"]
DOCS = ["README.md", "RESULTS.md", os.path.join("benchmarks", "README.md")]
# Default cells in words, and the argparse default each stands for.
WORDS = {"off": False, "none": None, "the checkpoint's": None, "beside the checkpoint": None}
ONE_REQUIRED = "one required"  # the row's options form a required mutually exclusive group
NO_DATA = ("error: no Flickr8K under data/; run ./run.sh --download, or ./run.sh --source DIR "
           "(a folder with Flickr8k_Dataset.zip and Flickr8k_text.zip)")


class _Parsed(Exception):
    pass


def script_parser(name, monkeypatch):
    """The ArgumentParser a script builds, caught at its first parse (nothing after it runs)."""
    module = importlib.import_module(name)
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(_Parsed):
            (getattr(module, "get_args", None) or module.main)([])
    return caught[0]


def flag_tables(text):
    """{script: [(options, default cell)]} from the README's option tables."""
    tables, script = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            named = re.findall(r"(\w+)\.py", line)
            script = named[-1] if named else None
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if script and line.startswith("| `--") and len(cells) >= 3:
            tables.setdefault(script, []).append((re.findall(r"--\w+", cells[0]), cells[1]))
    return tables


def expected(cell):
    text = cell.replace("`", "").strip()
    if text in WORDS:
        return WORDS[text]
    values = []
    for token in text.split():
        for kind in (int, float):
            try:
                token = kind(token)
                break
            except ValueError:
                pass
        values.append(token)
    return values[0] if len(values) == 1 else values


def test_readme_has_a_flag_table_per_script():
    tables = flag_tables(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
    assert sorted(tables) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_flag_defaults_match_argparse(script, monkeypatch):
    rows = flag_tables(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())[script]
    parser = script_parser(script, monkeypatch)
    actions = {o: a for a in parser._actions for o in a.option_strings}
    wrong = []
    for options, cell in rows:
        missing = [o for o in options if o not in actions]
        if missing:
            wrong.append(f"{', '.join(missing)}: not a flag of {script}.py")
            continue
        if cell == ONE_REQUIRED:
            group = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
            if {actions[o] for o in options} != group:
                wrong.append(f"{' / '.join(options)}: not {script}.py's required group of options")
            continue
        want, have = expected(cell), actions[options[0]].default
        same = have is want if want is None or isinstance(want, bool) else have == want
        if not same:
            wrong.append(f"{options[0]}: README says {cell}, {script}.py has {have!r}")
    assert not wrong, "\n".join(wrong)


def doc_commands():
    """(file, argv) of every `python <script>.py ...` line in the docs' bash blocks."""
    found = []
    for doc in DOCS:
        block = None
        for line in open(os.path.join(ROOT, doc), encoding="utf-8"):
            if line.startswith("```"):
                block = None if block is not None else line[3:].strip()
                continue
            if block != "bash":
                continue
            for part in re.split(r"&&|\||;", line.split("  #")[0]):
                words = shlex.split(part)
                if len(words) >= 2 and words[0] in ("python", "python3") and words[1].endswith(".py"):
                    name = words[1][:-3]
                    if name in SCRIPTS:
                        found.append((doc, name, words[2:]))
    return found


def test_doc_commands_parse(monkeypatch):
    commands = doc_commands()
    assert {name for _, name, _ in commands} == set(SCRIPTS)
    monkeypatch.chdir(ROOT)  # @configs/offline.txt is read from the repository root
    parsers = {name: script_parser(name, monkeypatch) for name in SCRIPTS}
    wrong = []
    for doc, name, argv in commands:
        try:
            parsers[name].parse_args(argv)
        except SystemExit:
            wrong.append(f"{doc}: python {name}.py {shlex.join(argv)}")
    assert not wrong, "these commands do not parse:\n" + "\n".join(wrong)


# run.sh, with a stub interpreter that logs its arguments and does nothing else.


@pytest.fixture
def run_sh(tmp_path):
    shutil.copy(os.path.join(ROOT, "run.sh"), tmp_path / "run.sh")
    stub = tmp_path / "stub_python"
    stub.write_text('#!/bin/sh\necho "$*" >> "$RUN_LOG"\n')
    stub.chmod(0o755)
    (tmp_path / "data").mkdir()

    def run(*args):
        log = tmp_path / "calls.txt"
        env = dict(os.environ, PYTHON=str(stub), RUN_LOG=str(log))
        proc = subprocess.run(["bash", str(tmp_path / "run.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        return proc, calls
    return run


@pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh needs bash")
def test_run_sh_without_data_refuses_in_one_line(run_sh):
    proc, calls = run_sh()
    assert proc.returncode == 2
    assert proc.stderr.strip() == NO_DATA
    assert calls == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh needs bash")
def test_run_sh_on_a_prepared_set_trains_evaluates_searches(run_sh, tmp_path):
    (tmp_path / "data" / "flickr8k").mkdir()
    (tmp_path / "data" / "flickr8k" / "captions.csv").write_text("image,caption,split\na.jpg,a dog,val\n")
    proc, calls = run_sh("--epochs", "5")
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls] == ["train.py", "evaluate.py", "search.py"]
    assert calls[0] == "train.py --data_dir data/flickr8k --model_dir models --epochs 5"
    assert "--split val" in calls[1]  # no test rows in captions.csv


@pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh needs bash")
@pytest.mark.parametrize("source", ["Flickr8k_Dataset.zip", "Flickr8k_text.zip",
                                    "Flickr8k_text/Flickr8k.token.txt", "kaggle/captions.txt"])
def test_run_sh_prepares_what_lies_under_data(run_sh, tmp_path, source):
    path = tmp_path / "data" / source
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    proc, calls = run_sh()
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == "preprocess_flickr8k.py --source data --data_dir data/flickr8k"
    assert [c.split()[0] for c in calls[1:]] == ["train.py", "evaluate.py", "search.py"]


@pytest.mark.parametrize("packed", [True, False], ids=["archives", "folders"])
def test_preprocess_finds_flickr8k_under_data_next_to_its_own_output(tmp_path, monkeypatch, packed):
    """What `./run.sh` runs on data/: `--source data`, whose output data/flickr8k lies inside it."""
    import io
    import zipfile

    from PIL import Image

    import preprocess_flickr8k

    files = {"Flickr8k.token.txt": "".join(f"{n}.jpg#{i}\t{n} caption {i}\n" for n in "abc" for i in range(5)),
             "Flickr_8k.trainImages.txt": "a.jpg\n", "Flickr_8k.devImages.txt": "b.jpg\n",
             "Flickr_8k.testImages.txt": "c.jpg\n"}
    photos = {}
    for n in "abc":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG")
        photos[f"Flicker8k_Dataset/{n}.jpg"] = buf.getvalue()
    data = tmp_path / "data"
    if packed:
        data.mkdir()
        for archive, members in (("Flickr8k_Dataset.zip", photos), ("Flickr8k_text.zip", files)):
            with zipfile.ZipFile(data / archive, "w") as zf:
                for name, content in members.items():
                    zf.writestr(name, content)
    else:
        for name, content in {**photos, **{f"Flickr8k_text/{k}": v for k, v in files.items()}}.items():
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            (data / name).write_bytes(content.encode() if isinstance(content, str) else content)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run finds the same data, not its own output
        preprocess_flickr8k.main(["--source", "data", "--data_dir", "data/flickr8k", "--cache_size", "0"])
        rows = (data / "flickr8k" / "captions.csv").read_text().splitlines()
        assert len(rows) == 16 and sorted(os.listdir(data / "flickr8k" / "images")) == ["a.jpg", "b.jpg", "c.jpg"]
