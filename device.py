"""The device and the precision: which device a script runs on (under torchrun: which device this
process runs on, and its process group), which autocast dtype each tower runs under there, and the
CPU allocator setting every script makes first. Example:

    python -c "import device; d = device.pick_device(); print(device.precision_summary(d))"
"""

import ctypes
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    CPU tensors come from malloc. By default glibc serves big blocks with mmap and unmaps them on
    free (and trims the heap's top), so every step's activations land in fresh pages that the
    kernel must fault in and zero: ~30,000 page faults per batch-32 training step of the image
    tower, ~110,000 per batch-64 forward. Keeping the memory removes them (see benchmarks/README.md,
    "CPU"). Returns whether it took effect: a no-op without glibc (macOS, Windows, musl).
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
    it first; keep_freed_memory(), the allocator setting, is each script's own call beside it."""
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


@contextmanager
def torchrun_device(name="auto"):
    """pick_device(name) for this process; under torchrun (which sets RANK and LOCAL_RANK, a plain
    `python train.py` neither) its own GPU, inside the process group of all of them: nccl on
    CUDA, gloo on CPU."""
    ddp = "RANK" in os.environ
    device = pick_device(name, int(os.environ["LOCAL_RANK"]) if ddp else None)
    if not ddp:
        yield device
        return
    if device.type == "mps":
        raise SystemExit("error: torchrun trains on CUDA (nccl) or CPU (gloo), not MPS; pass --device cpu.")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so collectives and barrier() use this process's GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank_and_world():
    """(this process's rank, number of processes) under torchrun, (0, 1) without."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX on x86; oneDNN's
    own probe). Elsewhere (AVX2-only laptops and VMs) bf16 autocast is emulated: converted in
    software and many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def autocast_dtype(device, tower, enabled=True):
    """The one precision policy: the autocast dtype for a tower ('image' or 'text'), or None (fp32).

    CUDA: bf16 for both towers. CPU: bf16 for the transformer only where the CPU runs bf16
    natively: there its matrix products run ~2.6x faster, but emulated they run ~20x slower
    than fp32 (benchmarks/precision.py; benchmarks/README.md). The image tower's depthwise
    convolutions stay fp32 on every CPU: they run slower in bf16. MPS: fp32, the safe choice
    across macOS releases.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and tower == "text" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device, tower, enabled=True):
    """The autocast context of autocast_dtype's choice (a no-op context for fp32)."""
    dtype = autocast_dtype(device, tower, enabled)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def precision_summary(device, enabled=True):
    """One line saying what the policy chose for `device` and why, for the start of a run."""
    names = {None: "fp32", torch.bfloat16: "bf16"}
    chosen = f"image tower {names[autocast_dtype(device, 'image', enabled)]}, " \
             f"text tower {names[autocast_dtype(device, 'text', enabled)]}"
    if not enabled:
        why = "--no_amp"
    elif device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        why = (f"CPU {cap} with native bf16" if cpu_has_native_bf16()
               else f"CPU {cap} without native bf16: bf16 would be emulated, many times slower")
    else:
        why = {"cuda": "CUDA: bf16 tensor cores", "mps": "MPS: fp32 is the safe choice"}.get(device.type, "")
    return f"precision on {device}: {chosen} ({why})"
