"""Export a trained checkpoint to ONNX, for search with onnxruntime (no PyTorch at search time).

    python export.py --checkpoint models/fast/best.pt
    python export.py --checkpoint models/fast/best.pt --int8

Writes <checkpoint without .pt>_onnx/ beside it: the text and image graphs (fp32; with --int8 also
a dynamically quantised text graph, for search.py's and serve.py's --int8), the tokenizer, the
querybank of a checkpoint that ranks with it, and export.json (encoder.py's docstring describes
the folder).
search.py and serve.py use it while it is current for the checkpoint. train.py exports best.pt
when training ends (write_export).
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys

import numpy as np

from encoder import EXPORT_VERSION, INT8, export_dir, file_sha256, log, normalise, session

MIN_COSINE = 0.9999  # an export must give the checkpoint's embeddings to this cosine, or it is not written
# The int8 text graph's floor on _check's captions: the per-channel graph that lost 0.3 of R@1 on
# Flickr8K val gives 0.98 there, onnxruntime's default quantisation (2.6 lost) less (RESULTS.md).
MIN_INT8_COSINE = 0.95
# What export.py --int8 quantises and how (onnxruntime's quantize_dynamic): the weights of the
# fused text graph's products per output channel in the 7-bit range that onnxruntime advises for
# CPUs without VNNI; the embedding table (a Gather) stays fp32.
INT8_QUANTISATION = {"op_types_to_quantize": ["MatMul", "Gemm", "Attention"], "per_channel": True,
                     "reduce_range": True}


def write_export(checkpoint, int8=None, data_dir=None):
    """Export a checkpoint (see the module docstring) and check it against PyTorch; returns the
    folder. int8: also the int8 text graph; None: if the export it replaces has one (so that
    train.py's export at the end of training keeps it). data_dir: where the training captions of
    a querybank checkpoint are (default: its args' data_dir); without them the export ranks by
    cosine similarity, with a warning."""
    import torch

    from checkpoint import eval_image_size, load_model
    from retrieval import caption_bank
    model, tokenizer, ckpt = load_model(checkpoint, torch.device("cpu"))  # a clear error for a bad file
    st, sha = os.stat(checkpoint), file_sha256(checkpoint)
    model.amp = False  # fp32 graphs, and the fp32 embeddings they must match
    args = ckpt["args"]
    folder = export_dir(checkpoint)
    if int8 is None:
        int8 = os.path.isfile(os.path.join(folder, "text.int8.onnx"))
    tmp = f"{folder}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise SystemExit(f"error: cannot write the export beside {checkpoint} ({e.strerror}); copy the checkpoint "
                         "(and its tokenizer folder) to a folder you can write and export it there.")
    try:
        size = eval_image_size(args)
        tokens = _export_graphs(model, tokenizer, tmp, size)
        _optimise(tmp, model.text_tower.config, tokens)
        if int8:
            _quantise(tmp)
        tokenizer.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))  # what the tokenizers library reads
        querybank = False
        if args.get("querybank"):
            data_dir = data_dir or args.get("data_dir") or ""
            if os.path.isfile(os.path.join(data_dir, "captions.csv")):
                np.save(os.path.join(tmp, "querybank.npy"),
                        caption_bank(model, tokenizer, data_dir, torch.device("cpu")).half().numpy())
                querybank = True
            else:
                log(f"warning: {checkpoint} ranks with querybank normalisation, but its training captions "
                    f"({os.path.join(data_dir, 'captions.csv')}) are not here: the export ranks by cosine "
                    "similarity. Pass --data_dir to include them.")
        meta = {"version": EXPORT_VERSION, "args": args, "image_size": size, "flip": bool(args.get("eval_flip")),
                "dim": model.image_proj.out_features, "mean": (model.mean[0, :, 0, 0] / 255).tolist(),
                "std": (model.std[0, :, 0, 0] / 255).tolist(), "logit_scale": model.logit_scale.exp().item(),
                "pad_id": tokenizer.pad_token_id, "querybank": querybank, "int8": INT8 if int8 else False,
                "checkpoint": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha},
                "files": {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}}
        with open(os.path.join(tmp, "export.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        _check(model, tokenizer, tmp, checkpoint, size)
        old = f"{folder}.{os.getpid()}.old"
        if os.path.isdir(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _export_graphs(model, tokenizer, folder, size):
    import warnings

    import torch
    import torch.nn.functional as F

    from dataset import tokenize

    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            return self.m._encode_texts(input_ids, attention_mask)

    class Image(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, images):
            return F.normalize(self.m.image_proj(self.m.image_tower(images).float()), dim=-1)

    # Padding in the example: with a mask of all ones transformers would leave masking out of the graph.
    tokens = tokenize(tokenizer, ["a photo", "a dog running through the snow beside a frozen lake"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter, not the torch.export one: for these two fixed graphs it writes
        # the same operators in a tenth of the time (seconds, not minutes, at the end of training).
        warnings.simplefilter("ignore")
        torch.onnx.export(Text().eval(), (ids, mask), os.path.join(folder, "text.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["txt_emb"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                        "attention_mask": {0: "batch", 1: "length"}, "txt_emb": {0: "batch"}})
        torch.onnx.export(Image().eval(), (torch.zeros(2, 3, size, size),), os.path.join(folder, "image.onnx"),
                          dynamo=False, input_names=["images"], output_names=["img_emb"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "img_emb": {0: "batch"}})
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _optimise(folder, text_config, tokens):
    """Make the fp32 graphs quick to load and run: the text graph's attention, layer norms and
    GELUs become onnxruntime's fused operators (its transformers optimizer, made for BERT-like
    towers; a tower it fails on, or fuses into other embeddings of `tokens`, keeps its graph as
    exported), and both graphs keep their weights in a .data file beside them, which onnxruntime
    maps instead of parsing: most of a cold query's session start (benchmarks/cold_search.py
    measures it). The fused graph needs onnxruntime, as search does."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model
    text = os.path.join(folder, "text.onnx")
    text_graph = onnx.load(text)
    try:
        with quiet():
            fused = optimize_model(text, "bert", num_heads=text_config.num_attention_heads,
                                   hidden_size=text_config.hidden_size).model
        want, got = (session(m.SerializeToString()).run(None, tokens)[0] for m in (text_graph, fused))
        if (want * got).sum(1).min() >= MIN_COSINE:
            text_graph = fused
        else:
            log("warning: onnxruntime's optimizer changed this text tower's embeddings; its graph is kept unfused")
    except Exception as e:  # the optimizer's own kinds, for a tower it does not know
        log(f"warning: onnxruntime's optimizer cannot fuse this text tower ({type(e).__name__}); its graph is kept "
            "unfused")
    for name, graph in (("text", text_graph), ("image", onnx.load(os.path.join(folder, "image.onnx")))):
        path = os.path.join(folder, f"{name}.onnx")
        onnx.save_model(graph, path, save_as_external_data=True, location=f"{name}.onnx.data")
        shutil.copymode(path, path + ".data")  # onnx writes it owner-only; readable as the graph is


def _quantise(folder):
    """text.int8.onnx beside the fp32 graphs (INT8_QUANTISATION), activations quantised on the
    fly: the settings that lost least recall (RESULTS.md); photos stay fp32: int8 convolutions
    lost far more and ran slower."""
    src, dst = os.path.join(folder, "text.onnx"), os.path.join(folder, "text.int8.onnx")
    quantise_dynamic(src, dst, use_external_data_format=True, **INT8_QUANTISATION)
    shutil.copymode(dst, dst + ".data")


def quantise_dynamic(src, dst, **settings):
    """onnxruntime's dynamic int8 quantisation of the graph src to dst, quietly (its advice to
    pre-process the model first is for static quantisation)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    # DefaultTensorType: the type of what the fused operators put out, which onnx's shape inference cannot tell.
    with quiet():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **settings)


@contextlib.contextmanager
def quiet():
    """onnxruntime's optimizer and quantiser log notes on each graph they read (under loggers of
    their own, or the root one): none reach the user while they run."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _check(model, tokenizer, folder, checkpoint, size):
    """Refuse an export whose graphs do not give the checkpoint's embeddings (min cosine over a
    few captions and photos below MIN_COSINE, for the int8 text graph MIN_INT8_COSINE)."""
    import torch

    from dataset import tokenize
    texts = ["a dog running through snow", "two children play on a beach beside the water", "a",
             "a man in a red jacket climbs a rock face while another holds the rope below him"]
    images = np.random.default_rng(0).integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    with torch.no_grad():
        tokens = tokenize(tokenizer, texts)
        want_txt = model.encode_texts(tokens["input_ids"], tokens["attention_mask"]).numpy()
        want_img = model.encode_images(torch.from_numpy(images)).numpy()
    mean, std = (model.mean[0, :, 0, 0] / 255).tolist(), (model.std[0, :, 0, 0] / 255).tolist()

    def text_cos(name):
        got = session(os.path.join(folder, name)).run(None, {"input_ids": tokens["input_ids"].numpy(),
                                                        "attention_mask": tokens["attention_mask"].numpy()})[0]
        return float((want_txt * got).sum(1).min())
    got_img = session(os.path.join(folder, "image.onnx")).run(None, {"images": normalise(images, mean, std)})[0]
    cos = min(text_cos("text.onnx"), float((want_img * got_img).sum(1).min()))
    if cos < MIN_COSINE:
        raise SystemExit(f"error: the export of {checkpoint} does not reproduce its embeddings (min cosine "
                         f"{cos:.6f} < {MIN_COSINE}); nothing was written. Please report this with the "
                         "checkpoint's image_encoder and text_encoder.")
    if os.path.isfile(os.path.join(folder, "text.int8.onnx")):
        cos = text_cos("text.int8.onnx")
        log(f"int8 text graph: min cosine to PyTorch fp32 {cos:.4f}")
        if cos < MIN_INT8_COSINE:
            raise SystemExit(f"error: the int8 text graph of {checkpoint} strays too far from its embeddings (min "
                             f"cosine {cos:.4f} < {MIN_INT8_COSINE}); nothing was written. Export it without --int8.")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--int8", action="store_true",
                   help="also write an int8 text graph, for search.py's and serve.py's --int8 (RESULTS.md)")
    p.add_argument("--data_dir", default=None,
                   help="dataset whose training captions are the querybank (default: the checkpoint's)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    folder = write_export(args.checkpoint, args.int8, args.data_dir)
    print(f"exported {args.checkpoint} to {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
