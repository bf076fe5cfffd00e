"""A trained checkpoint as search.py and serve.py use it: texts and photos in, L2-normalised
embeddings out. From its ONNX export on onnxruntime (no PyTorch: a small install and a fast cold
start) when the export is current for the checkpoint, else from the checkpoint on PyTorch
(export.py writes the export). Example:

    python -c "import encoder; e = encoder.load('models/fast/best.pt'); print(e.encode_texts(['a dog']).shape)"

An export is a folder beside the checkpoint (best.pt -> best_onnx/): text.onnx (token ids and
attention mask -> joint embedding), image.onnx (normalised photos -> joint embedding), both with a
dynamic batch (and length) and their weights beside them (text.onnx.data, image.onnx.data), with
export.py --int8 text.int8.onnx (and .data), tokenizer.json, querybank.npy (the training captions'
embeddings, for a checkpoint that ranks with querybank normalisation) and export.json: what
preprocessing needs, the checkpoint's args, and the checkpoint file's size, time and SHA-256, so
that a retrained best.pt never meets a stale export. export.json is written last: a folder
without it is no export.
"""

import hashlib
import importlib.util
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from helpers.atomic import read_keyed, write_keyed

EXPORT_VERSION = 1
MAX_LENGTH = 64  # tokens per caption, as dataset.tokenize truncates in training
TEXT_BATCH = 256  # captions per onnxruntime call
INT8 = "text"  # export.json's "int8" when export.py --int8 wrote text.int8.onnx (photos stay fp32)


def log(msg):
    print(msg, file=sys.stderr)


def export_command(checkpoint, int8=False):
    """The command that writes a checkpoint's export (with the int8 text graph), for messages."""
    return f"python export.py --checkpoint {checkpoint}{' --int8' if int8 else ''}"


def export_dir(checkpoint):
    """Where the export of a checkpoint lives: models/best.pt -> models/best_onnx."""
    return os.path.splitext(os.path.abspath(checkpoint))[0] + "_onnx"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def index_key(checkpoint_sha, image_size, flip):
    """What an index of photo embeddings is tied to: the checkpoint file (its content, so a copy
    keeps its indexes and a retrained one gets new ones) and how photos are encoded. Both
    runtimes give the same embeddings (to 1e-4 in cosine), so they share an index."""
    return hashlib.sha256(f"{checkpoint_sha}:image_size={image_size}:flip={flip}".encode()).hexdigest()[:16]


def normalise(images, mean, std):
    """(B, 3, S, S) uint8 -> float32 (B, 3, S, S), as model.DualEncoder normalises (mean, std in 0..1)."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1) * 255
    return (images.astype(np.float32) - m) / s


def l2_normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ExportProblem(Exception):
    """An export that is missing, stale or damaged: the message says which and what to do."""


# ---------------------------------------------------------------------------- onnxruntime

class OnnxEncoder:
    """The export of a checkpoint on onnxruntime. The image graph is loaded on first use: a text
    query over an indexed gallery never needs it."""

    runtime = "onnxruntime"

    def __init__(self, checkpoint, int8=False):
        self.folder, self.checkpoint = export_dir(checkpoint), checkpoint
        again = export_command(checkpoint, int8)
        meta_path = os.path.join(self.folder, "export.json")
        if not os.path.isfile(meta_path):
            raise ExportProblem(f"{checkpoint} has no export ({meta_path} not found)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("version") != EXPORT_VERSION:
                raise ValueError(f"version {meta.get('version')}, this code reads {EXPORT_VERSION}")
        except (OSError, ValueError) as e:
            raise ExportProblem(f"the export {self.folder} is damaged or from another version ({e}); "
                                f"write it again: {again}")
        if not _is_current(meta["checkpoint"], checkpoint):
            raise ExportProblem(f"the export {self.folder} is of an earlier {os.path.basename(checkpoint)} (the "
                                f"checkpoint changed since); refresh it: {again}")
        if int8 and meta["int8"] != INT8:  # True: int8 graphs of an earlier kind
            raise ExportProblem(f"the export {self.folder} has no int8 text graph; write it: {again}")
        for name, size in meta["files"].items():
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise ExportProblem(f"the export {self.folder} is damaged ({name} is missing or truncated); "
                                    f"write it again: {again}")
        self.meta, self.again = meta, again
        self.args = meta["args"]
        self.image_size, self.flip, self.dim = meta["image_size"], meta["flip"], meta["dim"]
        self.mean, self.std, self.logit_scale = meta["mean"], meta["std"], meta["logit_scale"]
        self.checkpoint_sha = meta["checkpoint"]["sha256"]
        self.fingerprint = index_key(self.checkpoint_sha, self.image_size, self.flip)
        self.text = _Opening(self._open, text_session, "text.int8.onnx" if int8 else "text.onnx")
        from tokenizers import Tokenizer
        self.tokenizer = self._open(Tokenizer.from_file, "tokenizer.json")
        self.tokenizer.enable_truncation(MAX_LENGTH)
        pad = meta["pad_id"]
        self.tokenizer.enable_padding(pad_id=pad, pad_token=self.tokenizer.id_to_token(pad))
        self._image = None

    def _open(self, reader, name):
        try:
            return reader(os.path.join(self.folder, name))
        except Exception as e:  # onnxruntime and tokenizers raise their own kinds for a damaged file
            raise ExportProblem(f"the export {self.folder} cannot be read ({name}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); write it again: {self.again}")

    def encode_texts(self, texts):
        """(Q, D) float32 embeddings of a list of strings."""
        out = [np.empty((0, self.dim), np.float32)]
        for i in range(0, len(texts), TEXT_BATCH):
            enc = self.tokenizer.encode_batch(list(texts[i:i + TEXT_BATCH]))
            ids = np.array([e.ids for e in enc], dtype=np.int64)  # (B, L), padded to the longest
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            out.append(self.text.run(None, {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(out)

    def encode_images(self, images):
        """(B, 3, S, S) uint8 -> (B, D) float32; with flip each photo averaged with its mirror
        image, as model.DualEncoder.encode_images."""
        if self._image is None:
            try:
                self._image = self._open(session, "image.onnx")
            except ExportProblem as e:
                raise SystemExit(f"error: {e}.")
        x = normalise(images, self.mean, self.std)

        def run(batch):
            return self._image.run(None, {"images": np.ascontiguousarray(batch)})[0]
        emb = run(x)
        return l2_normalise(emb + run(x[..., ::-1])) if self.flip else emb

    def querybank_key(self, data_dir):
        """Names the caption bank photos' querybank biases come from: the one in the export ("" and
        a warning if it has none: rank by cosine similarity)."""
        if self.meta["querybank"]:
            return f"export:{self.checkpoint_sha}"
        log(f"warning: {self.checkpoint} ranks with querybank normalisation, but its export holds no caption "
            f"bank; ranking by cosine similarity. Export again with --data_dir pointing at its training data.")
        return ""

    def caption_bank(self, data_dir, cache, key):
        """(M, D) float32 embeddings of the training captions: the querybank."""
        return np.load(os.path.join(self.folder, "querybank.npy")).astype(np.float32)


class _Opening:
    """A graph's session, opened on a thread and waited for at its first run: onnxruntime builds a
    session mostly without holding the GIL, so a cold query loads its tokenizer and scans the
    gallery meanwhile (benchmarks/README.md, "Search on the ONNX export")."""

    def __init__(self, opener, *args):
        pool = ThreadPoolExecutor(1)
        self._session = pool.submit(opener, *args)
        pool.shutdown(wait=False)

    def run(self, *args):
        try:
            session = self._session.result()
        except ExportProblem as e:  # a graph of the right size that onnxruntime cannot read
            raise SystemExit(f"error: {e}.") from None
        return session.run(*args)


def session(path, spin=True):
    """An onnxruntime session of one graph (its path, or its bytes), on the CPU."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def text_session(path):
    """The text graph's session, its threads sleeping between runs instead of spinning: a query's
    encoding is followed by NumPy's ranking, whose BLAS threads the spinning ones would slow down
    (and they it), which doubled a warm query on 2 cores (benchmarks/README.md)."""
    return session(path, spin=False)


def _is_current(recorded, checkpoint):
    """Whether the checkpoint file is the one the export was made from: the same size and time,
    else the same content (a copy). With no checkpoint beside it (only the export was copied),
    the export stands for it."""
    try:
        st = os.stat(checkpoint)
    except FileNotFoundError:
        return True
    if (st.st_size, st.st_mtime_ns) == (recorded["size"], recorded["mtime_ns"]):
        return True
    return st.st_size == recorded["size"] and file_sha256(checkpoint) == recorded["sha256"]


# ---------------------------------------------------------------------------- PyTorch

class TorchEncoder:
    """The checkpoint itself on PyTorch (and transformers): needs the full install."""

    runtime = "PyTorch"

    def __init__(self, checkpoint, device="auto"):
        import torch

        from checkpoint import eval_image_size, load_model
        from device import keep_freed_memory, pick_device
        keep_freed_memory()
        self.device = pick_device(device)
        self.model, self.tokenizer, ckpt = load_model(checkpoint, self.device)
        self.torch, self.checkpoint, self.args = torch, checkpoint, ckpt["args"]
        self.image_size, self.flip = eval_image_size(self.args), self.args.get("eval_flip", False)
        self.dim = self.model.image_proj.out_features
        self.logit_scale = self.model.logit_scale.exp().item()
        self.checkpoint_sha = file_sha256(checkpoint)
        self.fingerprint = index_key(self.checkpoint_sha, self.image_size, self.flip)

    def encode_texts(self, texts, desc="encoding queries"):
        from retrieval import encode_texts
        return encode_texts(self.model, self.tokenizer, list(texts), self.device, desc=desc).numpy()

    def encode_images(self, images):
        with self.torch.no_grad():
            x = self.torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            return self.model.encode_images(x, self.flip).cpu().numpy()

    def querybank_key(self, data_dir):
        """Names the caption bank photos' querybank biases come from: data_dir's training captions
        (its captions.csv's size and time), or "" and a warning if they are not there."""
        path = os.path.join(data_dir, "captions.csv")
        if os.path.isfile(path):
            st = os.stat(path)
            return f"{self.checkpoint_sha}:{os.path.realpath(data_dir)}:{st.st_size}:{st.st_mtime_ns}"
        log(f"warning: {self.checkpoint} ranks with querybank normalisation, which needs its training "
            f"captions ({path}: not found); ranking by cosine similarity instead. Pass --data_dir to point at them.")
        return ""

    def caption_bank(self, data_dir, cache, key):
        """(M, D) float32 embeddings of data_dir's training captions (retrieval.caption_bank), kept
        in `cache` (float16, 30 MB for Flickr8K's 30,000 captions) under `key`: photos added later
        need no second encoding of the bank (a minute or two on a CPU)."""
        from retrieval import caption_bank
        kept = read_keyed(cache, key)
        if kept is not None:
            return kept["bank"].astype(np.float32)
        bank = caption_bank(self.model, self.tokenizer, data_dir, self.device).half().numpy()
        write_keyed(cache, key, bank=bank)
        return bank.astype(np.float32)  # the same float16-rounded bank whether just encoded or read back


def _importable(name):
    try:
        importlib.import_module(name)  # the fallback imports it next anyway
        return True
    except ImportError:
        return False


def load(checkpoint, runtime="auto", device="auto", int8=False):
    """The encoder of a checkpoint: runtime 'onnx' (its export, or a clear error), 'torch', or
    'auto': the export when it is present and current, else PyTorch (on `device`). int8: text
    queries on the export's int8 text graph (export.py --int8), which only the export has."""
    if int8 and runtime == "torch":
        raise SystemExit("error: --int8 runs the export's int8 text graph on onnxruntime; it does not apply "
                         "to --runtime torch.")
    runtime = "onnx" if int8 else runtime  # never PyTorch instead: it has no int8 text tower
    if runtime in ("auto", "onnx"):
        try:
            return OnnxEncoder(checkpoint, int8)
        except ExportProblem as e:
            problem, missing = str(e), not os.path.isdir(export_dir(checkpoint))
        if runtime == "onnx" or not _importable("torch"):
            if missing:
                problem += f"; write one with the full install: {export_command(checkpoint, int8)}"
            raise SystemExit(f"error: {problem}." + ("" if runtime == "onnx" else
                             " PyTorch, the other way to run a checkpoint, is not installed either "
                             "(pip install -r requirements.txt)."))
        if missing and os.path.isfile(checkpoint):
            log(f"searching with PyTorch: no export of {checkpoint} ({export_command(checkpoint)} writes one, "
                "for a faster start)")
        elif not missing:
            log(f"warning: {problem}; searching with PyTorch meanwhile.")
    return TorchEncoder(checkpoint, device)
