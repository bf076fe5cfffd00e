"""The ONNX export and search on onnxruntime: parity with PyTorch for both architectures, the same
rankings from search.py, a search path without torch or transformers, stale and damaged exports."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny import make_checkpoint, photo, train_argv

import encoder
import export
import search
import serve
import train
from dataset import read_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle", "the square is blue", "a", "犬が走る 🐕", "a green square on grey " * 20]


def tiny_bert(folder, tiny_data):
    """A random-init 2-layer BERT of width 32 with the tiny dataset's vocabulary (the offline
    recipe's MiniLM is a BERT)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    tok = BertTokenizerFast(os.path.join(tiny_data, "text_encoder", "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """Two exported checkpoints, one of each architecture: MobileNetV3-small + DistilBERT ([CLS]),
    and EfficientNet-Lite0 + BERT (mean pooling) with the offline recipe's inference options
    (larger photos averaged with their mirror image, querybank ranking)."""
    root = tmp_path_factory.mktemp("export")
    mobile = make_checkpoint(root / "mobile" / "best.pt", os.path.join(tiny_data, "text_encoder"), 0)
    lite = make_checkpoint(root / "lite" / "best.pt", tiny_bert(root / "bert", tiny_data), 1,
                           image_encoder="efficientnet_lite0", text_pooling="mean", eval_image_size=40,
                           eval_flip=True, querybank=True, data_dir=tiny_data)
    for ck in (mobile, lite):
        assert export.main(["--checkpoint", ck]) == 0
    return {"mobile": mobile, "lite": lite}


def torch_fp32(checkpoint):
    enc = encoder.TorchEncoder(checkpoint, "cpu")
    enc.model.amp = False  # the export is fp32; bf16 autocast (native-bf16 CPUs) would differ by itself
    return enc


def photos_of(tiny_data, n=6):
    names = sorted(os.listdir(os.path.join(tiny_data, "images")))[::8][:n]
    return [os.path.join(tiny_data, "images", name) for name in names]


@pytest.mark.parametrize("arch", ["mobile", "lite"])
def test_export_gives_the_checkpoints_embeddings(exported, tiny_data, arch):
    onnx, ref = encoder.OnnxEncoder(exported[arch]), torch_fp32(exported[arch])
    assert (onnx.image_size, onnx.flip) == ((40, True) if arch == "lite" else (32, False))
    assert (ref.image_size, ref.flip, ref.fingerprint) == (onnx.image_size, onnx.flip, onnx.fingerprint)
    got, want = onnx.encode_texts(CAPTIONS), ref.encode_texts(CAPTIONS)
    assert got.shape == (len(CAPTIONS), 32) and (got * want).sum(1).min() >= 0.9999
    images = np.stack([read_image(p, onnx.image_size).numpy() for p in photos_of(tiny_data)])
    got, want = onnx.encode_images(images), ref.encode_images(images)
    assert got.shape == (len(images), 32) and (got * want).sum(1).min() >= 0.9999
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
    if arch == "lite":  # the mirror image counts: without it the embeddings are others
        ref.flip = False
        assert (got * ref.encode_images(images)).sum(1).min() < 0.9999
        # The querybank is the training captions' embeddings, in float16.
        bank, captions = onnx.caption_bank(tiny_data, None, None), train_captions(tiny_data)
        assert bank.shape == (len(captions), 32) and (bank * ref.encode_texts(captions)).sum(1).min() > 0.999


def test_the_text_graph_is_fused_and_the_weights_lie_beside_the_graphs(exported):
    """The fp32 text graph's layer norms run as onnxruntime's fused operators, and both graphs'
    weights are in a .data file (mapped when a session starts), readable as the graph is."""
    import onnx
    for arch, ck in exported.items():
        folder = encoder.export_dir(ck)
        ops = {n.op_type for n in onnx.load(os.path.join(folder, "text.onnx"), load_external_data=False).graph.node}
        assert "SkipLayerNormalization" in ops and "LayerNormalization" not in ops, arch
        if arch == "mobile":  # DistilBERT's attention too
            assert {"Attention", "BiasGelu"} <= ops
        for name in ("text.onnx", "image.onnx"):
            graph, data = os.path.join(folder, name), os.path.join(folder, name + ".data")
            assert os.path.getsize(graph) * 4 < os.path.getsize(data)
            assert os.stat(data).st_mode == os.stat(graph).st_mode


def train_captions(tiny_data):
    """The training captions in retrieval.caption_bank's order: by photo, then as in the file."""
    rows = [r.split(",") for r in open(os.path.join(tiny_data, "captions.csv")).read().splitlines()[1:]]
    rows = [r for r in rows if r[2] == "train"]
    return [r[1] for r in sorted(rows, key=lambda r: r[0])]


def search_json(capsys, *argv):
    capsys.readouterr()
    assert search.main([*map(str, argv), "--json", "--num_workers", "0", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("arch", ["mobile", "lite"])
def test_search_ranks_the_same_on_onnxruntime_and_pytorch(exported, tiny_data, tmp_path, capsys, arch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos_of(tiny_data, 8):
        shutil.copy(p, folder)
    common = ("--checkpoint", exported[arch], "--images_dir", folder, "--top_k", "8")
    for query in (("--query", "a red circle"), ("--image", next(folder.iterdir()))):
        runs = {rt: search_json(capsys, *common, *query, "--runtime", rt, "--index_dir", tmp_path / rt)
                for rt in ("onnx", "torch")}
        assert [r["path"] for r in runs["onnx"]] == [r["path"] for r in runs["torch"]]
        assert [r["score"] for r in runs["onnx"]] == pytest.approx([r["score"] for r in runs["torch"]], abs=2e-3)
    # The text ranking of the querybank checkpoint is biased: it differs from plain cosine order.
    with np.load(next((tmp_path / "onnx").glob("index_best_photos-*.npz"))) as ix:
        assert ("bias" in ix) == (arch == "lite")


BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "torchvision", "pandas"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, ROOT)
    import search, serve
    rc = search.main(sys.argv[1:])
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")], "imported"
    sys.exit(rc)
""")


def run_without_torch(*argv):
    code = BLOCKER.replace("ROOT", repr(ROOT))
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_search_needs_neither_torch_nor_transformers(exported, tiny_data, tmp_path):
    folder = tmp_path / "photos"
    for i in range(5):
        photo(folder / f"p{i}.jpg", i)
    common = ("--checkpoint", exported["lite"], "--images_dir", folder, "--index_dir", tmp_path, "--num_workers", "2")
    p = run_without_torch(*common, "--query", "a red circle", "--json")  # indexes the folder first
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)) == 5 and "5 added" in p.stderr
    photo(folder / "p5.jpg", 5)
    p = run_without_torch(*common, "--image", folder / "p5.jpg", "--json", "--top_k", "1")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["path"].endswith("p5.jpg") and "1 added" in p.stderr
    p = run_without_torch(*common, "--query", "a blue square", "--output_dir", tmp_path / "grid")  # the grid too
    assert p.returncode == 0 and os.listdir(tmp_path / "grid"), p.stderr
    # Without an export and without PyTorch: a clear error, not a traceback.
    bare = tmp_path / "bare" / "best.pt"
    os.makedirs(bare.parent)
    shutil.copy(exported["mobile"], bare)
    p = run_without_torch("--checkpoint", bare, "--images_dir", folder, "--query", "x")
    assert p.returncode == 1 and "has no export" in p.stderr and "python export.py" in p.stderr
    assert "Traceback" not in p.stderr


def test_stale_and_damaged_exports_are_refused(exported, tmp_path, capsys):
    src = os.path.dirname(exported["mobile"])
    shutil.copytree(src, tmp_path / "m", ignore=shutil.ignore_patterns("index_*"))
    ck = str(tmp_path / "m" / "best.pt")
    assert encoder.OnnxEncoder(ck).checkpoint_sha == encoder.file_sha256(ck)  # a copy: still current
    # Retrained: the same name, other weights. The export is stale: refused, or PyTorch instead.
    state = torch.load(ck, weights_only=True)
    state["model"]["image_proj.bias"] += 0.01
    torch.save(state, ck)
    with pytest.raises(SystemExit, match="earlier best.pt .*refresh it: python export.py"):
        encoder.load(ck, "onnx")
    capsys.readouterr()
    assert isinstance(encoder.load(ck, "auto", "cpu"), encoder.TorchEncoder)
    assert "searching with PyTorch meanwhile" in capsys.readouterr().err
    export.main(["--checkpoint", ck])
    assert isinstance(encoder.load(ck, "auto"), encoder.OnnxEncoder)  # refreshed
    folder = encoder.export_dir(ck)

    def query():  # the text graph is opened on a thread: one that is not a graph fails at the first query
        encoder.load(ck, "onnx").encode_texts(["a dog"])

    def damaged(name, data, start=query):
        path = os.path.join(folder, name)
        keep = open(path, "rb").read()
        open(path, "wb").write(data(keep))
        try:
            with pytest.raises(SystemExit, match="damaged|cannot be read") as e:
                start()
            return str(e.value)
        finally:
            open(path, "wb").write(keep)
    assert "text.onnx is missing or truncated" in damaged("text.onnx", lambda b: b[: len(b) // 2])
    assert "cannot be read" in damaged("text.onnx", lambda b: bytes(len(b)))  # same size, not a graph
    serving = serve.get_args(["--checkpoint", ck, "--images_dir", str(tmp_path), "--runtime", "onnx", "--port", "0"])
    assert "cannot be read" in damaged("text.onnx", lambda b: bytes(len(b)), lambda: serve.make_server(serving))
    assert "text.onnx.data is missing or truncated" in damaged("text.onnx.data", lambda b: b[:-4])
    assert "damaged or from another version" in damaged("export.json", lambda b: b[:-20])
    assert isinstance(encoder.load(ck, "onnx"), encoder.OnnxEncoder)  # restored


def test_train_exports_best_at_the_end_and_the_int8_text_graph(tiny_data, tmp_path, capsys):
    argv = [a for a in train_argv(tiny_data, tmp_path, "--epochs", "1") if a != "--no_export"]
    assert train.main(argv) == 0
    best = str(tmp_path / "best.pt")
    onnx = encoder.load(best, "onnx")
    assert onnx.checkpoint_sha == encoder.file_sha256(best)
    want = torch_fp32(best).encode_texts(CAPTIONS)
    assert (onnx.encode_texts(CAPTIONS) * want).sum(1).min() >= 0.9999
    assert export.main(["--checkpoint", best, "--int8"]) == 0
    int8 = encoder.load(best, "auto", int8=True)
    assert 0.9 < (int8.encode_texts(CAPTIONS) * want).sum(1).min() < 0.99999  # int8: near fp32, not it
    # Photos stay fp32: the same embeddings, so one index serves both.
    images = np.stack([read_image(p, onnx.image_size).numpy() for p in photos_of(tiny_data)])
    np.testing.assert_array_equal(int8.encode_images(images), onnx.encode_images(images))
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos_of(tiny_data):
        shutil.copy(p, folder)
    common = ("--checkpoint", best, "--images_dir", folder, "--top_k", "6", "--query", "a red circle",
              "--index_dir", tmp_path / "ix")
    fp32_rows, int8_rows = search_json(capsys, *common), search_json(capsys, *common, "--int8")
    assert sorted(r["path"] for r in fp32_rows) == sorted(r["path"] for r in int8_rows)
    fp32_scores = {r["path"]: r["score"] for r in fp32_rows}
    diffs = [abs(r["score"] - fp32_scores[r["path"]]) for r in int8_rows]
    assert 0 < max(diffs) < 0.1  # the query on the int8 graph, the photos as indexed
    assert len(list((tmp_path / "ix").glob("index_*.npz"))) == 1
    # serve.py takes the flag to the same encoder.
    server, library = serve.make_server(serve.get_args(["--checkpoint", best, "--images_dir", str(folder),
                                                        "--index_dir", str(tmp_path / "ix"), "--port", "0", "--int8"]))
    library.closing.set()
    library.indexing.join()
    server.server_close()
    np.testing.assert_array_equal(library.model.encode_texts(CAPTIONS), int8.encode_texts(CAPTIONS))
    # Exporting again keeps the int8 graph unless told otherwise (train.py's export at the end does that).
    export.write_export(best)
    assert os.path.isfile(os.path.join(encoder.export_dir(best), "text.int8.onnx"))
    assert export.main(["--checkpoint", best]) == 0
    assert not os.path.isfile(os.path.join(encoder.export_dir(best), "text.int8.onnx"))


def test_an_int8_graph_too_far_from_the_checkpoint_is_not_written(exported, tmp_path, monkeypatch):
    shutil.copytree(os.path.dirname(exported["mobile"]), tmp_path / "m")
    ck = str(tmp_path / "m" / "best.pt")
    before = sorted(os.listdir(encoder.export_dir(ck)))
    monkeypatch.setattr(export, "MIN_INT8_COSINE", 1.0)  # no int8 graph reaches it
    with pytest.raises(SystemExit, match="int8 text graph of .* strays too far .* Export it without --int8"):
        export.main(["--checkpoint", ck, "--int8"])
    assert sorted(os.listdir(encoder.export_dir(ck))) == before  # the export as it was
    assert sorted(os.listdir(tmp_path / "m")) == sorted(os.listdir(os.path.dirname(exported["mobile"])))


def test_a_text_tower_the_optimizer_cannot_fuse_is_exported_unfused(tiny_data, tmp_path, monkeypatch, capsys):
    import onnx
    from onnxruntime.transformers import optimizer

    def fails(*args, **kwargs):
        raise AttributeError("no such node")
    monkeypatch.setattr(optimizer, "optimize_model", fails)
    ck = make_checkpoint(tmp_path / "best.pt", os.path.join(tiny_data, "text_encoder"), 0)
    assert export.main(["--checkpoint", ck]) == 0
    assert "cannot fuse this text tower (AttributeError)" in capsys.readouterr().err
    folder = encoder.export_dir(ck)
    ops = {n.op_type for n in onnx.load(os.path.join(folder, "text.onnx"), load_external_data=False).graph.node}
    assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops
    got, want = encoder.OnnxEncoder(ck).encode_texts(CAPTIONS), torch_fp32(ck).encode_texts(CAPTIONS)
    assert (got * want).sum(1).min() >= 0.9999


def test_int8_needs_the_exports_int8_text_graph(exported, tmp_path):
    ck = exported["mobile"]  # exported without --int8
    with pytest.raises(SystemExit, match="has no int8 text graph; write it: python export.py .* --int8"):
        encoder.load(ck, "auto", "cpu", int8=True)  # an error, not PyTorch instead
    with pytest.raises(SystemExit, match="does not apply to --runtime torch"):
        encoder.load(ck, "torch", "cpu", int8=True)
    # int8 graphs of an earlier kind (both towers, export.json's "int8": true) are not used.
    shutil.copytree(os.path.dirname(ck), tmp_path / "m", ignore=shutil.ignore_patterns("index_*"))
    meta_path = tmp_path / "m" / "best_onnx" / "export.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "int8": True}))
    with pytest.raises(SystemExit, match="has no int8 text graph"):
        encoder.load(str(tmp_path / "m" / "best.pt"), "onnx", int8=True)


def test_warm_query_benchmark_times_the_export(exported, tiny_data, tmp_path, capsys, monkeypatch):
    """benchmarks/warm_query.py on a tiny export: it indexes the folder, then reports a p50 per
    query of at least its encoding's and ranking's p50s, on onnxruntime."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import warm_query
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos_of(tiny_data, 5):
        shutil.copy(p, folder)
    warm_query.main(["--checkpoint", exported["lite"], "--runtime", "onnx", "--rounds", "2", "--queries", "3",
                     "--", "--images_dir", str(folder), "--index_dir", str(tmp_path / "ix"), "--num_workers", "0"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("warm query on onnxruntime, 5 photos, 6 queries: p50 ")
    total, enc, rank = (float(x) for x in re.findall(r"p50 ([0-9.]+) ms", line))
    assert 0 < enc <= total and 0 < rank <= total
