"""Image files named by data (LLaVA-style SFT files, V-IRL route folders): confined to their folder, regular
files only, their pixel count checked from the header before anything is decoded, decoded lazily and cached.

A 140 KB PNG can declare 12000 x 12000 pixels (432 MB once decoded); a FIFO named ``.jpg`` blocks a reader
forever; ``../../`` in a data file reaches anywhere on the disk. Each is refused here, naming the file.
"""

from __future__ import annotations

import io
import os
import stat
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 40_000_000  # ~8K x 5K: far above any model input or panorama used here, 120 MB decoded
MAX_IMAGE_BYTES = 64 << 20  # a compressed file of that many pixels is far smaller; checked before opening


def confined_file(folder: str | os.PathLike, name: str | os.PathLike, where: str, kind: str = "file") -> Path:
    """``folder / name`` resolved, refused unless it stays inside ``folder`` (symbolic links followed) and is a
    regular file (not a FIFO, device or directory)."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{where}: {str(name)!r} points outside its folder {str(root)!r}")
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise ValueError(f"{where}: cannot read {kind} {str(path)!r} ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{where}: {str(path)!r} is not a regular file")
    return path


def check_image_header(path: str | os.PathLike | io.BytesIO, where: str, max_pixels: int = MAX_IMAGE_PIXELS,
                       max_bytes: int = MAX_IMAGE_BYTES) -> tuple[int, int]:
    """Width and height from the file's header (nothing decoded); refused when the file (or the bytes of an image
    stored in a dataset) is over ``max_bytes`` (checked before it is opened), the header over ``max_pixels``, or
    unreadable."""
    try:
        size = path.getbuffer().nbytes if isinstance(path, io.BytesIO) else os.stat(path).st_size
    except OSError as error:
        raise ValueError(f"{where}: cannot read image {str(path)!r} ({error.strerror or error})") from None
    if size > max_bytes:
        raise ValueError(f"{where}: image {str(path)!r} is {size:,} bytes, more than the limit of {max_bytes:,} "
                         "(max_image_bytes)")
    try:
        with Image.open(path) as handle:
            width, height = handle.size
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where}: cannot read image {str(path)!r}: {error}") from None
    if width * height > max_pixels:
        raise ValueError(f"{where}: image {str(path)!r} is {width} x {height} pixels, more than the limit of "
                         f"{max_pixels:,} (max_image_pixels)")
    return width, height


def check_image_whole(path: str | os.PathLike | io.BytesIO, where: str) -> None:
    """Refuse an image whose data is damaged or cut short: PNG chunks are checked against their CRCs
    (``verify``), other formats are decoded (``verify`` passes a truncated JPEG). Call after
    :func:`check_image_header`, which bounds what decoding can cost. A truncated file used to pass the header
    check and kill the run mid-training ("image file is truncated"), naming neither file nor sample."""
    try:
        with Image.open(path) as handle:
            png = handle.format == "PNG"
            handle.verify()
        if not png:
            if isinstance(path, io.BytesIO):
                path.seek(0)
            with Image.open(path) as handle:
                handle.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where}: image {str(path)!r} is damaged or truncated ({error})") from None


@lru_cache(maxsize=256)
def load_rgb(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The decoded RGB image at ``path`` (checked first), cached by path: records naming one file share it."""
    check_image_header(path, path, max_pixels)
    with Image.open(path) as handle:
        return np.asarray(handle.convert("RGB"))  # shared by every record naming the file: never change it in place
