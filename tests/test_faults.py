"""Faults and bad input for train.py, evaluate.py and checkpoints: every one ends in one clear message
and a non-zero exit, and loses nothing. (Downloads, archives, captions files and photos: test_preprocess.py.)"""

import ast
import errno
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import train_argv

import checkpoint
import dataset
import device
import evaluate
import model
import preprocess_flickr8k as pf
import train
from dataset import build_image_cache, read_captions
from helpers import interrupt
from retrieval import encode_texts

ROOT = Path(__file__).resolve().parents[1]


def fast_argv(data_dir, model_dir, *extra):
    """train_argv with 32-pixel photos: the fastest run that still trains."""
    return train_argv(data_dir, model_dir, "--image_size", "32", *extra)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def ckpt_path(tiny_data, tmp_path_factory):
    """A small checkpoint written by checkpoint.save_checkpoint, as train.py writes them."""
    torch.manual_seed(0)
    m = model.DualEncoder(text_encoder=f"{tiny_data}/text_encoder", embedding_dim=16, pretrained=False)
    args = {"image_encoder": "mobilenet_v3_small", "text_encoder": f"{tiny_data}/text_encoder",
            "embedding_dim": 16, "text_pooling": "cls", "temperature": 0.07, "fixed_temperature": False,
            "image_size": 32, "no_pretrained": True, "data_dir": tiny_data}
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    checkpoint.save_checkpoint(str(path), m, args, epoch=1, metrics=None)
    return path


@pytest.fixture(scope="module")
def one_step_run(tiny_data, tmp_path_factory):
    """A model_dir whose last.pt holds one training step (and everything a resume needs)."""
    run = tmp_path_factory.mktemp("run")
    assert train.main(fast_argv(tiny_data, run, "--epochs", "1", "--max_steps", "1")) == 0
    return run


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def tiny_copy(tiny_data, dst, keep=("train", "val", "test")):
    """The tiny dataset with only some splits (photos and text encoder shared through links)."""
    dst.mkdir()
    for name in ("images", "text_encoder"):
        (dst / name).symlink_to(Path(tiny_data) / name)
    lines = Path(tiny_data, "captions.csv").read_text().splitlines()
    (dst / "captions.csv").write_text("\n".join(lines[:1] + [ln for ln in lines[1:]
                                                             if ln.rsplit(",", 1)[1] in keep]) + "\n")
    return dst


# --- interruption -----------------------------------------------------------------------


def run_training(script, argv, err_path):
    """train.py's main() under `script` (Python code run with argv), in its own process group;
    stderr (tqdm bars) to a file. Returns (exit status, stderr)."""
    with open(err_path, "w") as err:
        proc = subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=err, start_new_session=True, timeout=300)
    return proc.returncode, err_path.read_text()


# The whole process group gets the signal as step 3 of the epoch begins: 3 steps are done and more are
# to come, and both DataLoader workers have delivered a batch, so both are running. Sent from inside
# the run, so it lands there on any machine, however loaded or fast.
AT_STEP_3 = """import os, sys, train
real = train.lr_factor
def lr_factor(step, *a):
    if step == 3:
        os.killpg(0, {sig})
    return real(step, *a)
train.lr_factor = lr_factor
sys.exit(train.main(sys.argv[1:]))
"""

# SIGKILL in the middle of writing a checkpoint: half of the new file is on disk, and nothing can be
# cleaned up.
KILLED_WHILE_SAVING = """import os, signal, sys, torch, train
real = torch.save
def half_then_killed(obj, f, *a, **k):
    real(obj, f, *a, **k)
    os.truncate(f, os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_killed
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigint_then_sigkill_during_training_then_resume(tiny_data, tmp_path):
    run = tmp_path / "run"
    last = run / "last.pt"
    argv = fast_argv(tiny_data, run, "--epochs", "1", "--num_workers", "2")  # 15 steps of 16 pairs
    # Ctrl-C in a terminal reaches the whole process group, DataLoader workers included.
    returncode, err = run_training(AT_STEP_3.format(sig=int(signal.SIGINT)), argv, tmp_path / "err1")
    assert returncode == 130 and "Traceback" not in err, err
    assert "interrupted: saved" in err and "continue with --resume" in err
    first = checkpoint.read_checkpoint(str(last))
    assert (first["epoch"], first["epoch_step"], first["step"]) == (0, 3, 3)  # the position within the epoch
    saved = last.read_bytes()

    # SIGKILL cannot be caught: even one that lands mid-write leaves last.pt the last complete checkpoint.
    # (--max_steps 4: one more step, then the end of the run's checkpoint.)
    returncode, _ = run_training(KILLED_WHILE_SAVING, [*argv, "--num_workers", "0", "--max_steps", "4", "--resume"],
                                 tmp_path / "err2")
    assert returncode == -signal.SIGKILL
    assert last.read_bytes() == saved and any(n.startswith("last.pt.") for n in os.listdir(run))  # the half file

    assert train.main([*argv, "--num_workers", "0", "--resume"]) == 0
    ck = checkpoint.read_checkpoint(str(last))
    assert (ck["epoch"], ck["step"]) == (1, 15)  # no batch trained twice or skipped


def test_sigterm_to_the_process_group_saves_like_ctrl_c(tiny_data, tmp_path):
    # A scheduler's time limit or `docker stop` sends SIGTERM, often to every process of the job:
    # the DataLoader workers must outlive it until the main process has saved.
    run = tmp_path / "run"
    argv = fast_argv(tiny_data, run, "--epochs", "1", "--num_workers", "2")
    returncode, err = run_training(AT_STEP_3.format(sig=int(signal.SIGTERM)), argv, tmp_path / "err")
    assert returncode == 143 and "Traceback" not in err, err
    assert "terminated: saved" in err and "continue with --resume" in err
    ck = checkpoint.read_checkpoint(str(run / "last.pt"))
    assert (ck["epoch"], ck["epoch_step"], ck["step"]) == (0, 3, 3)


# The whole process group gets the signal the moment the first DataLoader worker is forked: before
# that worker has run a line of its own, while the main process is still starting the other one.
AT_FIRST_FORK = """import os, sys, train
sent = []
def send():
    if not sent:
        sent.append(os.killpg(0, {sig}))
os.register_at_fork(after_in_parent=send)
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, status, said", [(signal.SIGTERM, 143, "terminated"),
                                              (signal.SIGINT, 130, "interrupted")])
def test_a_signal_as_the_epoch_starts_its_workers_saves_too(tiny_data, tmp_path, sig, status, said):
    run = tmp_path / "run"
    argv = fast_argv(tiny_data, run, "--epochs", "1", "--num_workers", "2")
    returncode, err = run_training(AT_FIRST_FORK.format(sig=int(sig)), argv, tmp_path / "err")
    assert returncode == status and "Traceback" not in err and "Error" not in err, err
    assert f"{said}: saved" in err
    ck = checkpoint.read_checkpoint(str(run / "last.pt"))
    assert (ck["epoch"], ck["epoch_step"], ck["step"]) == (0, 0, 0)


def blocked_in_a_child():
    """The signals blocked in a process forked now."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, " ".join(str(int(s)) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return {int(s) for s in f.read().split()}


def test_workers_forked_while_training_never_see_ctrl_c_or_sigterm():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with interrupt.stop_signals():
        assert {signal.SIGINT, signal.SIGTERM} <= blocked_in_a_child()
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main process still gets them
    assert not {signal.SIGINT, signal.SIGTERM} & blocked_in_a_child()  # only while train.py trains


def test_a_signal_while_a_batch_is_fetched_is_raised_once_it_is_in():
    fetched = []

    class Loader:
        def __iter__(self):
            return self

        def __next__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            fetched.append(sum(range(1000)))  # Python runs the handler before this line
            return fetched[-1]
    with interrupt.stop_signals(), pytest.raises(interrupt.Terminated):
        next(interrupt.held(Loader()))
    assert fetched == [499500]
    with interrupt.stop_signals(), pytest.raises(KeyboardInterrupt):  # and at once outside held()
        os.kill(os.getpid(), signal.SIGINT)
        fetched.append(0)
    assert fetched == [499500]


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "search.py"])
def test_ctrl_c_before_training_is_one_line_and_exit_130(script, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(device, "pick_device", interrupt)  # the first thing the scripts do
    monkeypatch.setattr(sys, "argv", [script, "--device", "cpu", *(["--query", "a dog"] * (script == "search.py"))])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert e.value.code == 130 and capsys.readouterr().err.strip().startswith("interrupted;")


# --- checkpoints ---------------------------------------------------------------------------


def rewrite(src, dst, change):
    ckpt = torch.load(src, weights_only=True)
    change(ckpt)
    torch.save(ckpt, dst)


CHECKPOINT_CASES = {
    "truncated": ("not a readable checkpoint .* truncated or damaged",
                  lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])),
    "empty": ("not a readable checkpoint", lambda src, dst: dst.write_bytes(b"")),
    "a tensor": ("not a checkpoint of this project", lambda src, dst: torch.save(torch.zeros(3), dst)),
    "a bare state dict": ("not a checkpoint of this project",
                          lambda src, dst: torch.save(weights(src), dst)),
    "older args": (r"older or different version of this project: its args lack \['text_pooling'\]",
                   lambda src, dst: rewrite(src, dst, lambda c: c["args"].pop("text_pooling"))),
    "other embedding_dim": ("does not fit the model its args describe .*size mismatch for image_proj.weight",
                            lambda src, dst: rewrite(src, dst, lambda c: c["args"].update(embedding_dim=24))),
    "missing weights": ('does not fit .*Missing key.*"text_proj.weight"',
                        lambda src, dst: rewrite(src, dst, lambda c: c["model"].pop("text_proj.weight"))),
    "unknown text tower": ("text encoder configuration is not usable",
                           lambda src, dst: rewrite(src, dst, lambda c: c["args"]["text_config"].update(
                               model_type="no-such-model"))),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_is_one_clear_error(ckpt_path, tmp_path, case):
    pattern, make = CHECKPOINT_CASES[case]
    bad = tmp_path / "bad.pt"
    make(ckpt_path, bad)
    with pytest.raises(SystemExit, match="^error: .*" + pattern):
        evaluate.main(["--checkpoint", str(bad), "--device", "cpu", "--num_workers", "0"])


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a malicious file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "args": Payload(str(marker))}, evil)
    with pytest.raises(SystemExit, match="^error: refusing .*evil.pt: it holds Python objects that could run code"):
        checkpoint.read_checkpoint(str(evil))
    with pytest.raises(SystemExit, match="cannot read image weights"):
        model.build_image_tower("mobilenet_v3_small", pretrained=False, weights_path=str(evil))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file is really armed: an unsafe load runs the payload
    assert marker.exists()


def test_torch_load_is_weights_only_everywhere():
    """Every torch.load in the scripts passes weights_only=True, and no np.load allows pickles."""
    calls = 0
    for path in [*ROOT.glob("*.py"), *ROOT.glob("helpers/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.attr == "load"):
                continue
            kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if node.func.value.id == "torch":
                calls += 1
                assert kw.get("weights_only") is True, f"{path.name}:{node.lineno}"
            if node.func.value.id == "np":
                assert kw.get("allow_pickle") in (None, False), f"{path.name}:{node.lineno}"
    assert calls >= 2


def test_image_weights_that_do_not_fit_are_one_clear_error(tmp_path):
    wrong = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(SystemExit, match=r"w.pt is not a state dict of mobilenet_v3_small \(Missing key"):
        model.build_image_tower("mobilenet_v3_small", pretrained=False, weights_path=str(wrong))
    wrong.write_bytes(b"not a tensor file")
    with pytest.raises(SystemExit, match="cannot read image weights"):
        model.build_image_tower("mobilenet_v3_small", pretrained=False, weights_path=str(wrong))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos")])
def test_a_failed_checkpoint_write_keeps_the_previous_file(ckpt_path, tmp_path, monkeypatch, failure):
    path = tmp_path / "last.pt"
    shutil.copy(ckpt_path, path)
    before = path.read_bytes()
    m, _, ck = checkpoint.load_model(str(path), torch.device("cpu"))

    def full_disk(obj, f):
        Path(f).write_bytes(before[:100])  # half written when the disk fills up
        raise failure
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"could not write .*last.pt .*the previous .*last.pt is intact\. Free disk"):
        checkpoint.save_checkpoint(str(path), m, ck["args"], 2, None)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_resume_refuses_what_it_cannot_continue(tiny_data, one_step_run, tmp_path):
    run = copy_run(one_step_run, tmp_path / "run")
    argv = fast_argv(tiny_data, run, "--epochs", "2", "--resume")
    with pytest.raises(SystemExit, match=r"cannot resume from .*last.pt \(ValueError: .*--freeze_image"):
        train.main([*argv, "--freeze_image"])  # the optimizer state has the image tower's parameters
    rewrite(run / "last.pt", run / "last.pt", lambda c: c.pop("rng_state"))
    with pytest.raises(SystemExit, match=r"cannot resume from .*last.pt \(KeyError: 'rng_state'\)"):
        train.main(argv)
    (run / "last.pt").write_bytes((one_step_run / "last.pt").read_bytes()[:5000])
    with pytest.raises(SystemExit, match="last.pt is not a readable checkpoint"):
        train.main(argv)


# --- numbers -------------------------------------------------------------------------------


def test_inf_loss_at_the_first_step_says_nothing_was_saved(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "info_nce", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(SystemExit, match=r"^error: loss became inf at step 0; stopping \(no checkpoint yet\)"):
        train.main(fast_argv(tiny_data, tmp_path))
    assert not (tmp_path / "last.pt").exists()


def test_nan_weights_are_never_saved(tiny_data, one_step_run, tmp_path, monkeypatch):
    """A finite loss with NaN gradients poisons the weights; the epoch's checkpoint must not keep them."""
    run = copy_run(one_step_run, tmp_path / "run")
    good = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt")}
    real = train.train_epoch

    def poisoned(m, *a, **k):
        out = real(m, *a, **k)
        with torch.no_grad():
            m.text_proj.weight[0, 0] = float("nan")
        return out
    monkeypatch.setattr(train, "train_epoch", poisoned)
    with pytest.raises(SystemExit, match=r"weights became NaN or infinite by step 2; stopping without saving "
                                         r"them \(the last good checkpoint .*last.pt is kept\)"):
        train.main(fast_argv(tiny_data, run, "--epochs", "2", "--max_steps", "2", "--resume"))
    assert {name: (run / name).read_bytes() for name in good} == good


def test_missing_or_empty_splits(tiny_data, ckpt_path, tmp_path):
    no_val = tiny_copy(tiny_data, tmp_path / "no_val", keep=("train", "test"))
    with pytest.raises(SystemExit, match="^error: split 'val' has no captions in .*; rerun preprocess"):
        train.main(fast_argv(no_val, tmp_path / "run"))
    with pytest.raises(SystemExit, match="^error: split 'val' has no captions"):
        evaluate.main(["--checkpoint", str(ckpt_path), "--data_dir", str(no_val), "--split", "val", "--device", "cpu"])
    with pytest.raises(SystemExit, match="^error: .*captions.csv not found; run preprocess_flickr8k.py"):
        evaluate.main(["--checkpoint", str(ckpt_path), "--data_dir", str(tmp_path / "nowhere"), "--device", "cpu"])


def test_captions_csv_damaged_after_preprocessing(tiny_data, tmp_path):
    data = tiny_copy(tiny_data, tmp_path / "d")
    text = (data / "captions.csv").read_text()
    (data / "captions.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())  # Excel's BOM, CRLF
    assert len(read_captions(str(data), "val")) == 40
    (data / "captions.csv").write_bytes(text.replace("a red", "a r\xe9d").encode("latin-1"))
    with pytest.raises(SystemExit, match="^error: .*captions.csv is not the UTF-8 CSV .*rerun preprocess"):
        read_captions(str(data), "val")


def test_evaluate_batch_larger_than_gallery_writes_json_atomically(ckpt_path, tmp_path):
    out = tmp_path / "r" / "test.json"
    assert evaluate.main(["--checkpoint", str(ckpt_path), "--batch_size", "1000", "--output_json", str(out),
                          "--num_workers", "0", "--device", "cpu"]) == 0
    assert '"n_images": 8' in out.read_text() and os.listdir(out.parent) == ["test.json"]


def test_empty_long_and_non_ascii_queries_encode_to_unit_vectors(ckpt_path):
    m, tokenizer, _ = checkpoint.load_model(str(ckpt_path), torch.device("cpu"))
    emb = encode_texts(m, tokenizer, ["", "a dog " * 5000, "日本語のキャプション café 🐕‍🦺", "\t\n"],
                       torch.device("cpu"))
    assert emb.shape == (4, 16) and torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_full_disk_while_caching_images_is_one_clear_error(tiny_data, tmp_path, monkeypatch):
    """Writing into a memory map on a full disk would kill the process with SIGBUS; the cache claims
    its space first, so a full disk is an ordinary error."""
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: no space left on the device .*run again"):
        pf.main(["--captions", f"{tiny_data}/captions.csv", "--images", f"{tiny_data}/images",
                 "--data_dir", str(out), "--cache_size", "16"])
    assert os.listdir(out / "cache") == []  # no half-built cache


def test_interrupted_image_cache_is_never_used_and_rebuilds(tiny_data, tmp_path, monkeypatch):
    data = tiny_copy(tiny_data, tmp_path / "d")

    def interrupt(*a):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(dataset, "read_image", interrupt)
        with pytest.raises(KeyboardInterrupt):
            build_image_cache(str(data), "val", 16)
    assert os.listdir(data / "cache") == []  # no array, no image list, no temporary file
    assert dataset.ImageStore(str(data), ["red_circle_7.jpg"], 16, "val").cache is None
    npy = build_image_cache(str(data), "val", 16)
    assert np.load(npy).shape == (8, 16, 16, 3)


# --- flags -------------------------------------------------------------------------------


@pytest.mark.parametrize("main, argv", [
    (train.main, ["--bogus"]), (train.main, ["--lr", "-1"]), (train.main, ["--temperature", "nan"]),
    (train.main, ["--weight_decay", "inf"]), (train.main, ["--batch_size", "0"]),
    (train.main, ["--no_pretrained", "--image_weights", "w.pt"]), (train.main, ["--image_encoder", "vit"]),
    (train.main, ["--eval_image_size", "-1"]), (evaluate.main, ["--querybank", "--no_querybank"]),
    (evaluate.main, ["--bogus"]), (evaluate.main, ["--split", "dev"]), (evaluate.main, ["--batch_size", "0"]),
])
def test_bad_flags_get_argparse_errors(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [("foo", "unknown --device 'foo'"), ("cuda:3", "CUDA"),
                                             ("meta", "not supported")])
def test_bad_device_is_one_clear_error(tiny_data, tmp_path, device, message):
    if device == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a fourth GPU")
    with pytest.raises(SystemExit, match=message):
        train.main(fast_argv(tiny_data, tmp_path, "--device", device))
