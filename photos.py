"""Reading photos into model inputs with Pillow and NumPy alone, so search on the exported model
needs no PyTorch: every way a photo comes in (datasets, the image cache, the gallery index, a
query photo, an upload) decodes through read_image. Example:

    python -c "import photos; print(photos.read_image('data/flickr8k/images/667626_18933d713e.jpg', 224).shape)"
"""

import calendar
import functools
import time
from datetime import datetime

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# What search.py indexes in a personal folder. HEIC/HEIF (the iPhone's photos) need pillow-heif;
# Pillow reads AVIF itself.
HEIF_EXTENSIONS = (".heic", ".heif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", *HEIF_EXTENSIONS, ".avif")


@functools.cache
def _heif_opener():
    """Register pillow-heif's HEIC/HEIF opener with Pillow, once per process. Returns whether
    pillow-heif is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _open(path):
    """Image.open, with pillow-heif's opener registered first for a HEIC/HEIF name, or once Pillow
    alone cannot identify a file (a HEIC photo by another name, an upload): importing pillow-heif
    costs about as much as decoding a photo, and a folder of JPEGs never needs it."""
    if str(path).lower().endswith(HEIF_EXTENSIONS) and not _heif_opener():
        raise OSError("reading HEIC/HEIF photos needs pillow-heif: pip install pillow-heif")
    # Read before the try: another thread may register the opener while this one fails without it.
    had_heif = "HEIF" in Image.OPEN
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        if had_heif or not _heif_opener():
            raise
    return Image.open(path)  # from the start again: Image.open seeks a file object to 0 itself


def open_rgb(path, size):
    """Open any photo as an upright RGB PIL image, at least `size` pixels a side unless smaller.

    Handles what a personal photo folder holds: EXIF orientation, greyscale, 16-bit, CMYK,
    palette and transparent images (composited on white), the first frame of an animation,
    HEIC/HEIF and AVIF. Raises (OSError, ValueError, ...) on an unreadable file, and on one above
    Pillow's MAX_IMAGE_PIXELS (89 MP): such a header more likely belongs to a decompression bomb.
    """
    with _open(path) as img:
        # Checked here, not by turning Pillow's warning into an error: warning filters are
        # process-wide, and serve.py decodes in several threads at once.
        if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels, more than "
                                               f"{Image.MAX_IMAGE_PIXELS}: a decompression bomb?")
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT: a 500x375
        # photo bound for 224 pixels decodes about 2x faster and the result is the same size.
        img.draft("RGB", (size, size))
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block does not make the pixels unreadable
            img = img.copy()
        return _to_rgb(img)


def taken_at(path, mtime_ns):
    """When a photo was taken, as wall-clock seconds (its local date and time, counted as if UTC):
    EXIF DateTimeOriginal, which has no time zone, else the file's modification time in this
    machine's time zone. Reads the file's header only."""
    try:
        with _open(path) as img:
            text = img.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal)
        # "2024:06:01 14:30:00"; cameras with no clock set write zeros or blanks
        return calendar.timegm(datetime.strptime(str(text).strip("\0 ")[:19], "%Y:%m:%d %H:%M:%S").timetuple())
    except Exception:
        return calendar.timegm(time.localtime(mtime_ns // 1_000_000_000))


def _to_rgb(img):
    if img.mode.startswith("I"):
        # 16- and 32-bit greyscale: convert() would clip at 255 and turn most pixels white.
        arr = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Transparent regions hold arbitrary colours (often black); show them on white.
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def read_image(path, size):
    """Decode one image file (a path or a file object) to a (3, size, size) uint8 array: shorter
    side to `size`, centre crop, bilinear, as training saw its photos."""
    img = ImageOps.fit(open_rgb(path, size), (size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def read_or_blank(path, size):
    """(read_image's array, '') or, for a file that cannot be read, (zeros, why): an undecodable
    file is reported and skipped, never a crash."""
    try:
        return read_image(path, size), ""
    except Exception as e:
        return np.zeros((3, size, size), dtype=np.uint8), f"{type(e).__name__}: {e}"[:200]
