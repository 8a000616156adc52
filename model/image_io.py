"""Safe image loading: file paths, URLs, data URIs, bytes, PIL images, numpy arrays, torch tensors.

`load_image(source)` returns a decoded `PIL.Image.Image` in its own mode (the processors convert
to RGB; arrays and tensors come back as RGB, see image_processing.to_rgb_array). Every failure raises `ImageLoadError` with what went wrong and what to do about it.

Decisions:
- EXIF orientation IS applied to images loaded from files, URLs and bytes, like transformers'
  `load_image` and every image viewer, so the model sees the photo the way the user does.
  PIL images handed over already decoded are taken as they are (the processors do not rotate).
- Animated images (GIF, APNG, WebP) give their first frame.
- Pixel limit: images larger than `MAX_IMAGE_PIXELS` are refused from the header, before any
  pixel is decoded, so a decompression bomb cannot exhaust memory.
- `max_side`: a caller that needs no more pixels (a model sees at most a few tiles) gets the
  image shrunk to fit a max_side square, decoded at a reduced scale where the format allows
  (JPEG), before anything else copies it; `image.info["original_size"]` keeps the file's size.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 128_000_000  # ~ a 13000 x 9800 photo; a decoded RGB copy is ~384 MB
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
URL_TIMEOUT_S = 20.0


class ImageLoadError(ValueError):
    """An image could not be read; the message says why and what to do."""


def load_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int | None = None) -> Image.Image:
    """Decode `source` (path, URL, data URI, bytes, PIL image, numpy array or torch tensor) to a PIL
    image; with `max_side`, one that fits a max_side x max_side square (aspect ratio kept)."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "The image")
        return source
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), "the given bytes", max_pixels, max_side)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            return _decode(_download(source), source, max_pixels, max_side)
        if source.startswith("data:"):
            return _decode(_data_uri(source), "the data URI", max_pixels, max_side)
        return _decode(_read_file(source), source, max_pixels, max_side)
    if isinstance(source, np.ndarray) or type(source).__module__.startswith("torch"):
        from .image_processing import to_rgb_array  # arrays are validated where they are converted

        return Image.fromarray(to_rgb_array(source))
    raise ImageLoadError(
        f"Cannot read an image from a {type(source).__name__}. Pass a file path, an http(s) URL, a data URI, "
        "bytes, a PIL image, a numpy array or a torch tensor.")


def _read_file(path: str) -> bytes:
    file = Path(path).expanduser()
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(f"Image file not found: {path}. Check the path (relative paths start at "
                             f"{os.getcwd()}).") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path} is a folder, not an image file. Pass the path of one image.") from None
    except PermissionError:
        raise ImageLoadError(f"No permission to read {path}. Make the file readable or copy it elsewhere.") from None
    except OSError as error:
        raise ImageLoadError(f"Cannot read {path}: {error}. Check the file and try again.") from None
    return data


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ImageLoadError(f"Could not download the image at {url}: {error}. Check the address and the network, "
                             "or download the file and pass its path.") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageLoadError(f"The image at {url} is larger than {MAX_DOWNLOAD_BYTES // 2**20} MB. "
                             "Download and shrink it, then pass the file path.")
    return data


def _data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise ImageLoadError("Only base64 data URIs are supported (data:image/png;base64,...). Encode the image "
                             "in base64 or pass a file path.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError("The data URI does not hold valid base64. Re-encode the image.") from None


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{what} is {width}x{height} = {width * height / 1e6:.0f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.0f} megapixels (this guards against decompression bombs). "
            "Shrink the image before sending it, or raise max_pixels if you trust the file.")
    if width < 1 or height < 1:
        raise ImageLoadError(f"{what} has no pixels ({width}x{height}). Pass a non-empty image.")


def _decode(data: bytes, name: str, max_pixels: int, max_side: int | None = None) -> Image.Image:
    if not data:
        raise ImageLoadError(f"{name} is empty (0 bytes). Pass a complete image file.")
    with warnings.catch_warnings():
        # PIL's own bomb check warns or raises on its fixed limit; we apply ours from the header instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageLoadError(f"{name} is not an image PIL can read (PNG, JPEG, GIF, WebP, BMP, TIFF...). "
                                 "Check that it really is an image file.") from None
        except Image.DecompressionBombError:
            image = None
        except (OSError, SyntaxError, ValueError) as error:  # e.g. a header cut short
            raise ImageLoadError(f"{name} could not be read ({error}); the file is probably truncated or "
                                 "corrupt. Re-save or re-download it.") from None
        if image is None:
            raise ImageLoadError(f"{name} declares more pixels than PIL will decode (a guard against decompression "
                                 "bombs). Shrink the image before sending it.")
        _check_pixels(image.size, max_pixels, f"{name}")
        try:
            image.seek(0)  # animated images: the first frame
            original_size = image.size
            if max_side is not None and max(image.size) > max_side:
                image.draft(image.mode, (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
                image.load()
                # A square bound: shrinking before the EXIF rotation gives the same result, cheaper.
                image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            image.load()
            stored = image.size
            image = ImageOps.exif_transpose(image)
            if stored != original_size:
                turned = image.size != stored  # the EXIF rotation swapped the sides
                image.info["original_size"] = original_size[::-1] if turned else original_size
        except Image.DecompressionBombError:
            raise ImageLoadError(f"{name} is a decompression bomb. Shrink the image before sending it.") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageLoadError(f"{name} could not be decoded ({error}); the file is probably truncated or "
                                 "corrupt. Re-save or re-download it.") from None
    return image
