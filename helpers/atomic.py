"""Atomic file writes: every file the project writes (checkpoints, captions.csv, the image cache,
indexes, metrics) appears whole or not at all. Example:

    with atomic_write("results/val.json") as f:
        json.dump(metrics, f)

The data is written to `<path>.<pid>.tmp` in the same folder, so the final os.replace() is one
rename on one filesystem: a reader sees the old file or the new one, and a crash or error mid-write
leaves the old one intact. On an error the temporary file is removed. The process id keeps two
processes that write the same file at once (search.py and serve.py updating one index) from
writing into each other's temporary file.

Its own small module, not part of checkpoint.py: preprocess_flickr8k.py and dataset.py write
files too, and importing it must cost them neither torch nor the model.
"""

import os
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` for writers that take a path (torch.save, a memory
    map); on success it replaces `path`, on any error (Ctrl-C included) it is removed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """open(path, mode, **open_kwargs) for writing, through atomic_path: the file object is
    closed (flushed) before the rename."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def read_keyed(path, key):
    """The arrays a write_keyed(path, key, ...) stored, as a dict, or None when the file is missing,
    damaged or was written under another key."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as data:  # arrays only: a file cannot run code
            if str(data["key"]) == key:
                return {name: data[name] for name in data.files if name != "key"}
    except Exception:
        pass
    return None


def write_keyed(path, key, **arrays):
    """Keep arrays in a .npz file under `key`, atomically; a folder that cannot be written is
    no error (the caller computes them again next time)."""
    import numpy as np
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, key=np.array(key), **arrays)
    except OSError:
        pass
