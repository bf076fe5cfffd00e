"""The text tower and tokenizer for search.py without importing transformers.

A cold `python search.py --query ...` spent 2 of its 5.5 s on 2 CPU cores importing transformers
(its version checks and model classes), all to run one caption through a 6-layer encoder. These
are the same computations in plain PyTorch: a BERT or DistilBERT encoder built from the config
and weights a checkpoint already holds, and the `tokenizers` library reading the tokenizer.json
that train.py saves. Training and evaluate.py keep using transformers itself;
tests/test_plain_text.py checks both give the same embeddings.
"""

import json
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

# Weight names, relative to the tower, of each kind's embeddings and of layer i's parts.
LAYOUTS = {
    "bert": {"layers": "encoder.layer", "q": "attention.self.query", "k": "attention.self.key",
             "v": "attention.self.value", "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
             "ff1": "intermediate.dense", "ff2": "output.dense", "ln2": "output.LayerNorm",
             "heads": "num_attention_heads", "eps": "layer_norm_eps", "act": "hidden_act"},
    "distilbert": {"layers": "transformer.layer", "q": "attention.q_lin", "k": "attention.k_lin",
                   "v": "attention.v_lin", "o": "attention.out_lin", "ln1": "sa_layer_norm",
                   "ff1": "ffn.lin1", "ff2": "ffn.lin2", "ln2": "output_layer_norm",
                   "heads": "n_heads", "eps": None, "act": "activation"},
}
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def supports(config):
    """Whether PlainTextTower can run a text tower of this config (a checkpoint's text_config)."""
    kind = LAYOUTS.get(config.get("model_type"))
    return (kind is not None and config.get(kind["act"], "gelu") in ACTIVATIONS
            and not config.get("sinusoidal_pos_embds", False)
            and config.get("position_embedding_type", "absolute") == "absolute")


class PlainTextTower(nn.Module):
    """Inference-only BERT / DistilBERT encoder: (input_ids, attention_mask) -> an object with
    last_hidden_state (B, L, H), like the transformers model it replaces. `state` holds the
    tower's weights under transformers' names (the checkpoint's "text_tower." entries)."""

    def __init__(self, config, state):
        super().__init__()
        self.kind = LAYOUTS[config["model_type"]]
        self.config = SimpleNamespace(hidden_size=config.get("hidden_size", config.get("dim")))
        self.heads = config[self.kind["heads"]]
        self.eps = config[self.kind["eps"]] if self.kind["eps"] else 1e-12  # DistilBERT's fixed eps
        self.act = ACTIVATIONS[config.get(self.kind["act"], "gelu")]
        self.n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(self.kind["layers"] + "."))
        for name, tensor in state.items():  # buffers, so .to(device) moves them; '.' is not allowed
            self.register_buffer(name.replace(".", "__"), tensor)

    def w(self, name):
        return getattr(self, name.replace(".", "__"))

    def linear(self, x, name):
        return F.linear(x, self.w(name + ".weight"), self.w(name + ".bias"))

    def layer_norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w(name + ".weight"), self.w(name + ".bias"), self.eps)

    def forward(self, input_ids, attention_mask):
        b, n = input_ids.shape
        x = self.w("embeddings.word_embeddings.weight")[input_ids]
        x = x + self.w("embeddings.position_embeddings.weight")[:n]
        if hasattr(self, "embeddings__token_type_embeddings__weight"):  # BERT: every token is type 0
            x = x + self.w("embeddings.token_type_embeddings.weight")[0]
        x = self.layer_norm(x, "embeddings.LayerNorm")
        keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, L): no token attends to padding

        def heads(t):  # (B, L, H) -> (B, heads, L, H / heads)
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        for i in range(self.n_layers):
            p = f"{self.kind['layers']}.{i}."
            q, k, v = (heads(self.linear(x, p + self.kind[part])) for part in "qkv")
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, n, -1)
            x = self.layer_norm(x + self.linear(a, p + self.kind["o"]), p + self.kind["ln1"])
            h = self.linear(self.act(self.linear(x, p + self.kind["ff1"])), p + self.kind["ff2"])
            x = self.layer_norm(x + h, p + self.kind["ln2"])
        return SimpleNamespace(last_hidden_state=x)


class PlainTokenizer:
    """The subset of a transformers fast tokenizer's call that dataset.tokenize uses, on the
    tokenizer.json that train.py saves beside its checkpoints."""

    def __init__(self, folder):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            pad = json.load(f).get("pad_token", "[PAD]")
        self.pad_id = self.tok.token_to_id(pad)

    def __call__(self, texts, padding="longest", truncation=True, max_length=64, return_tensors="pt"):
        assert padding == "longest" and truncation and return_tensors == "pt"
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=self.pad_id, pad_token=self.tok.id_to_token(self.pad_id))
        enc = self.tok.encode_batch(list(texts))
        return {"input_ids": torch.tensor([e.ids for e in enc]),
                "attention_mask": torch.tensor([e.attention_mask for e in enc])}


def usable(folder, config):
    """Whether search.py can skip transformers for this checkpoint: a config PlainTextTower runs,
    and a saved tokenizer.json."""
    return supports(config) and all(os.path.isfile(os.path.join(folder, f))
                                    for f in ("tokenizer.json", "tokenizer_config.json"))
