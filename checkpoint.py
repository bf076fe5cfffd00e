"""Checkpoints: a plain dict of weights, train.py's arguments, epoch and metrics that
torch.load(weights_only=True) reads, written atomically; and the model rebuilt from one. A
training checkpoint also holds train.py's position and the optimizer, to resume from. Example:

    python -c "import checkpoint; print(checkpoint.read_checkpoint('models/best.pt')['args'])"

evaluate.py and search.py rebuild the model from the checkpoint's own args, so no flag has to be
repeated and no pretrained weights are fetched.
"""

import os
from contextlib import nullcontext

import torch

from helpers.atomic import atomic_path
from model import DualEncoder, first_line, load_tokenizer, state_dict_mismatch

# The arguments of train.py that define a model and how evaluate.py and search.py use it: a
# checkpoint's args hold them, and a resume rebuilds the run's model from them, whatever flags it
# is given. Every checkpoint has MODEL_ARGS; LATER_MODEL_ARGS came later (older checkpoints lack
# them, and read the defaults: model_from_args, eval_image_size).
MODEL_ARGS = ("image_encoder", "text_encoder", "embedding_dim", "text_pooling", "temperature",
              "fixed_temperature", "image_size")
LATER_MODEL_ARGS = ("no_pretrained", "image_weights", "text_config", "eval_image_size", "eval_flip", "querybank")


def model_from_args(args, pretrained=None):
    """Build a DualEncoder from a dict of train.py's arguments."""
    if pretrained is None:
        pretrained = not args.get("no_pretrained", False)
    return DualEncoder(image_encoder=args["image_encoder"], text_encoder=args["text_encoder"],
                       embedding_dim=args["embedding_dim"], text_pooling=args["text_pooling"],
                       temperature=args["temperature"], fixed_temperature=args["fixed_temperature"],
                       pretrained=pretrained, image_weights=args.get("image_weights"),
                       text_config=args.get("text_config"), amp=args.get("amp", True))


def training_args(args, ckpt=None):
    """The args a run's checkpoints record: train.py's flags (a Namespace) and amp. Resuming from
    `ckpt`, its MODEL_ARGS and LATER_MODEL_ARGS win: the model is rebuilt as it was trained,
    inference options included (so validation stays comparable); flags given now only steer training."""
    model_args = {**vars(args), "amp": not args.no_amp}
    if ckpt is not None:
        model_args.update({k: ckpt["args"][k] for k in MODEL_ARGS + LATER_MODEL_ARGS if k in ckpt["args"]})
    return model_args


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
    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        kept = f"the previous {path} is intact" if os.path.exists(path) else f"no {path} was written"
        raise SystemExit(f"error: could not write {path} ({first_line(e)}); {kept}. Free disk space "
                         "(or fix the folder's permissions) and run again.")


def save_training(path, model, args, state, optimizer=None):
    """A checkpoint of a training run: save_checkpoint's dict with train.py's `state` (epoch, step,
    position in the epoch, best R-sum, history) and the RNG state. With the optimizer (last.pt) a
    run resumes from it; without (best.pt, for evaluate.py and search.py) it is about half the
    size, and every cold search.py call reads it."""
    # Never let a diverged model replace a good checkpoint (the loss check misses NaN gradients).
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise SystemExit(f"error: the weights became NaN or infinite by step {state['step']}; "
                         f"stopping without saving them ({last_kept(os.path.dirname(path))}). Try a lower --lr.")
    metrics = state["history"][-1]["val"] if state["history"] else None
    save_checkpoint(path, model, args, state["epoch"], metrics, optimizer, rng_state=torch.get_rng_state(),
                    **{k: v for k, v in state.items() if k != "epoch"})


def last_kept(model_dir):
    """What a run that stops on an error keeps: its last.pt, if it has written one."""
    last = os.path.join(model_dir, "last.pt")
    return f"the last good checkpoint {last} is kept" if os.path.exists(last) else "no checkpoint yet"


def resume_training(ckpt, path, model, optimizer, state):
    """Load save_training's checkpoint `ckpt` (read from `path`) into the model and the optimizer,
    and the RNG state; returns the run's state (the keys of `state`) as it was saved."""
    load_weights(model, ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
        torch.set_rng_state(ckpt["rng_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: cannot resume from {path} ({type(e).__name__}: {e}): it is not a "
                         "training checkpoint of this train.py, or the run used another --freeze_image. "
                         "Resume with the run's own flags, or start a new --model_dir.")
    return state


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
        why = "not a PyTorch checkpoint" if "Weights only load failed" in str(e) else first_line(e)
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
        raise SystemExit(f"error: {path} does not fit the model its args describe ({state_dict_mismatch(e)}); it comes "
                         "from another version or configuration. Use a checkpoint written by this train.py.")


def load_model(path, device):
    """Rebuild the model of a checkpoint from its own args: no flag has to be repeated, and no
    pretrained weights are fetched. Returns (model in eval mode, tokenizer, ckpt)."""
    ckpt = read_checkpoint(path)
    args = ckpt["args"]
    # The checkpoint overwrites every weight, so skip the random initialisation: it is most of the
    # time of building the towers, which every evaluate.py and PyTorch search would pay.
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # moved in some release: then initialise as usual
        no_init_weights = nullcontext
    with no_init_weights():
        model = model_from_args(args, pretrained=False)
    load_weights(model, ckpt["model"], path)
    # train.py saves the tokenizer beside its checkpoints, so search works offline.
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else args["text_encoder"])
    return model.to(device).eval(), tokenizer, ckpt
