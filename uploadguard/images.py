"""Compress uploaded photos with Pillow: upright, private, never larger, and fast.

A phone photo is 12-50 megapixels, lies on its side (the camera stores an EXIF
Orientation tag instead of turning the pixels) and carries the GPS position where
it was taken. The usual fix - ``Image.open``, ``ImageOps.exif_transpose``, a
LANCZOS resize, ``save(quality=85)`` - decodes every pixel at full size twice
(~0.3 s and ~120 MiB for 12 MP, ~1.1 s and ~390 MiB for 48 MP on 2 cores), and
re-encoding a q75 JPEG at q85 makes it ~10 % *bigger*. :func:`compress_image`:

* **Upright.** EXIF orientations 1-8 are applied to the pixels and the tag is not
  written again, so no viewer turns the photo a second time - except in the
  lossless original below, whose pixels stay as stored and whose new, minimal
  EXIF holds the Orientation tag, which every viewer honours.
* **Private.** EXIF (GPS, serial numbers, ...), XMP, IPTC, comments and PNG text
  are dropped. The ICC profile is kept whenever it still describes the pixels; a
  CMYK image is converted to sRGB through its profile.
* **Never larger.** When the pixels need no resize and no format change (and the
  image is one frame, not CMYK), the re-encode is compared with the original:

  - nothing to turn or drop, and the re-encode not smaller: the original bytes
    come back (``changed=False``), but only a JPEG, PNG or WebP whose every part
    is known to be harmless: a walk over its segments or chunks finds what Pillow
    does not report (private PNG chunks, JPEG comments between scans, bytes after
    the end of the image). JPEG may keep JFIF without thumbnail, ICC and Adobe
    segments; PNG IHDR, PLTE, IDAT, IEND, tRNS, gAMA, cHRM, sRGB, iCCP, cICP,
    sBIT, pHYs and bKGD; WebP VP8, VP8L, VP8X, ALPH and ICCP; plus one EXIF
    block with ``keep_exif``.
  - otherwise, when the original stripped losslessly is no bigger than the
    re-encode, that comes back (``changed=True``): a JPEG rebuilt from its own
    tables and scans with JFIF (thumbnail removed), ICC and Adobe segments, and a
    new EXIF block holding only the orientation (with ``keep_exif`` also the
    allow-listed tags); other APPn segments, comments and bytes after the image
    are dropped. A PNG that needs no turn keeps the chunks listed above (a new
    eXIf with ``keep_exif``). WebP, a PNG that needs turning (viewers do not all
    honour a PNG's EXIF orientation) and a file with a part not known to be safe
    to copy get the re-encode.

  GIF, AVIF and HEIC are always re-encoded. A JPEG whose pixels are not resampled
  is re-encoded at no more than its own quality, estimated from its quantisation
  tables: more would only make it bigger.
* **Fast and lean.** With ``max_dimension`` a JPEG is decoded straight at 1/2, 1/4
  or 1/8 scale by libjpeg (``Image.draft``), so full-size pixels are never
  allocated; ``bench/README.md`` has measurements against naive Pillow and libvips.
* **Safe.** Only JPEG, PNG, WebP and GIF are opened, plus AVIF when Pillow reads
  it and HEIC when pillow-heif is installed (its opener is registered on first
  use). The pixel count is checked from the header before decoding; a truncated or
  corrupt file raises ImageError, never gives a half-grey picture. No process-wide
  Pillow setting (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``)
  is changed, so calls are thread-safe. Before Pillow reads a JPEG, PNG or GIF, a
  walk over its framing (the entropy-coded data is searched in C, ~1 GB/s) bounds
  the work that does not come from pixels, so that no file costs much more than a
  normal photo with as many pixels: at most 100 JPEG scans (libjpeg decodes every
  block once per scan; libjpeg's own progressive files have 10), 512 JPEG segments,
  PNG chunks (plus one per 1024 pixels) or GIF blocks (plus one per 128 pixels),
  16 KiB of garbage between them, 4 MiB of ICC profile, EXIF, XMP or PNG text
  (inflated: Pillow inflates up to 64 MB), 512 tags in one EXIF directory. Only
  the first frame of an animation is ever read, so frame counts cost nothing.
* **Memory.** Peak memory grows with the pixel count (measured at 24 MP): up to
  ~10 MiB per megapixel for JPEG, PNG and GIF (~7 below quality 90, where colour
  is subsampled), ~11.5 for CMYK JPEG, ~17 for WebP (libwebp's canvas and
  Pillow's copy of it). With ``max_dimension`` a baseline JPEG is decoded scaled:
  ~2 MiB per source megapixel (a progressive one keeps all its coefficients: ~7).
  At the default 80 MP cap the worst file needs ~1.3 GiB: set ``max_pixels`` (and
  ``max_dimension``) to what a worker can afford.

Pillow is imported on first use: without it this module imports, and calls raise
ImageError naming the extra: ``pip install 'uploadguard[images]'``.

compress_image(source, *, ...) -> CompressedImage

source
    ``bytes``, a binary file object (anything with ``read()``, e.g. a Django
    ``UploadedFile``; rewound with ``seek(0)`` when seekable, left open) or a path.
quality: int = DEFAULT_QUALITY (85)
    1-100 for JPEG, WebP and AVIF; PNG is lossless. HIGH_QUALITY (95) is for
    images that will be edited or printed. From 90 up JPEG keeps full colour
    resolution (4:4:4); below, colour is subsampled (4:2:0), as libvips does.
max_dimension: int | None = None  # pixels, long edge
    Shrink so that the long edge is at most this; never enlarge.
exact: bool = False
    False ("bounded"): the long edge ends between 90 % and 100 % of max_dimension,
    whichever size is cheapest: libjpeg's 1/2, 1/4 or 1/8 scale or an integer
    ``reduce()`` when one lands in that band (4000x3000 with max_dimension=2048
    gives 2000x1500), else a BICUBIC resize to exactly max_dimension. True: the
    long edge is exactly max_dimension (decoded at the smallest DCT scale still at
    least that big, then BICUBIC; a resize of over 2 MP runs on two threads).
format: str | None = None
    "JPEG", "WEBP", "PNG" or "AVIF" (when ``PIL.features.check("avif")``). None:
    WebP stays WebP; anything else becomes JPEG, or PNG if it has visible
    transparency (JPEG flattens it onto ``background``). Screenshots and drawings
    are better off with "PNG" or "WEBP".
keep_exif: bool = False
    Keep the allow-listed EXIF tags: camera (make, model), lens (make, model,
    specification), exposure (time, aperture, ISO, flash, focal length, metering,
    white balance, ...), date and time (with offsets), resolution and colour space.
    Everything else goes: GPS, serial numbers, owner, artist, copyright, computer,
    software, descriptions and comments, unique ids, maker notes, the thumbnail;
    XMP always goes.
    EXIF the output cannot hold (a JPEG's 64 KB segment) is dropped, and logged
    at INFO on the "uploadguard" logger.
optimize: bool = True
    Optimised JPEG Huffman tables: ~5 % smaller, ~12 ms slower for 3 MP.
progressive: bool = False
    Progressive JPEG: ~3 % smaller again, but about twice as slow to encode.
background: tuple[int, int, int] = (255, 255, 255)
    The colour transparent pixels are flattened onto for JPEG.
max_pixels: int = DEFAULT_MAX_PIXELS (80 megapixels)  # width x height
    Larger images are refused before decoding (only the first frame of an
    animation is decoded). Memory grows with it: up to ~17 MiB per megapixel
    (see Memory above). Pillow's own ``Image.MAX_IMAGE_PIXELS`` (89.5 MP: a
    warning above, an error above twice that) still applies and is never changed
    here: raise it once at start-up to accept, say, 108 MP photos.

Modes: CMYK (Adobe's inverted CMYK too) becomes RGB; 16-bit greyscale is scaled
to 8 bits, not clipped; palette and 1-bit images become RGB(A) or L; animated
GIF, WebP and PNG keep their first frame.

:func:`compress_images` runs compress_image over several sources on a thread pool
(Pillow releases the GIL while decoding and resizing, not while encoding JPEG) and
returns the results in order; a failure raises ImageError naming the position.

Errors: :class:`ImageError`, a ``ValueError`` with a message for people and a
``code``: "empty", "unsupported", "too_large", "corrupt", "missing_dependency",
"encode_failed", and for files built to cost more than their pixels (see Safe):
"too_many_scans", "too_many_parts", "metadata_too_large". "too_large" is also
raised, before encoding, for a side longer than the output format allows: JPEG
65500 pixels, WebP 16383, AVIF 32768 (what libavif reads back); ``max_dimension``
brings such an image within bounds.
"encode_failed" is any other error of Pillow's encoder (the cause is chained).
Bad options raise ``ValueError``; a missing path ``FileNotFoundError``. A JPEG
damaged mid-stream (not truncated) decodes with garbled blocks: libjpeg only
warns, and Pillow does not pass that on.

Usage::

    from uploadguard.images import ImageError, compress_image

    try:
        photo = compress_image(request.FILES["photo"], max_dimension=2048)
    except ImageError as exc:
        form.add_error("photo", str(exc))
    else:
        default_storage.save(f"photos/{uuid.uuid4().hex}{photo.extension}",
                             ContentFile(photo.data))
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import math
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, TypeAlias

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_QUALITY",
    "HIGH_QUALITY",
    "CompressedImage",
    "ImageError",
    "ImageSource",
    "compress_image",
    "compress_images",
    "input_formats",
    "output_formats",
]

logger = logging.getLogger("uploadguard")

DEFAULT_QUALITY = 85
HIGH_QUALITY = 95
DEFAULT_MAX_PIXELS = 80_000_000  # any phone up to 64 MP; below Pillow's 89.5 MP warning

_INSTALL_HINT = "pip install 'uploadguard[images]'"
_BOUNDED_FLOOR = 0.9  # bounded mode accepts a long edge down to 90 % of max_dimension
_PARALLEL_PIXELS = 2_000_000  # resizing an image this big is split over two threads
_MIME = {"JPEG": ("image/jpeg", ".jpg"), "PNG": ("image/png", ".png"),
         "WEBP": ("image/webp", ".webp"), "AVIF": ("image/avif", ".avif"),
         "GIF": ("image/gif", ".gif"), "HEIF": ("image/heic", ".heic")}
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_NAMES = {"WEBP": "WebP", "HEIF": "HEIC"}  # format names for people, where they differ
_MAX_SIDE = {"JPEG": 65_500, "WEBP": 16_383, "AVIF": 32_768}  # pixels; AVIF: what libavif reads
# Image.info keys that carry nothing personal: the original may be handed back with them.
_HARMLESS_INFO = frozenset(
    "jfif jfif_version jfif_unit jfif_density dpi adobe adobe_transform progressive"
    " progression icc_profile transparency gamma srgb chromaticity aspect interlace"
    " background version loop duration timestamp default_image".split())
# File parts that carry nothing personal: only a file made of these may be handed back.
# EXIF (one block, judged tag by tag) is added when keep_exif is set.
_PNG_CHUNKS = frozenset(b"IHDR PLTE IDAT IEND tRNS gAMA cHRM sRGB iCCP cICP sBIT pHYs bKGD".split())
_WEBP_CHUNKS = frozenset((b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ICCP"))
# JPEG markers with tables or frame data: SOFn, DHT, DAC (not 0xC8: reserved); SOS, DQT, DNL, DRI
_JPEG_TABLES = frozenset((*range(0xC0, 0xD0), 0xDA, 0xDB, 0xDC, 0xDD)) - {0xC8}
_JPEG_APPS = {0xE2: b"ICC_PROFILE\0", 0xEE: b"Adobe"}  # APP2, APP14; APP0 JFIF is checked apart
_IJG_LUMA_SUM = 3688  # sum of the JPEG standard (Annex K) luminance table, quality 50
_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM",
              5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
_ORIENTATION, _GPS_IFD, _EXIF_IFD = 0x0112, 0x8825, 0x8769
# keep_exif keeps only these tags (an allow-list: a deny-list kept Artist, XPAuthor and
# HostComputer). IFD0: Make, Model, XResolution, YResolution, ResolutionUnit, DateTime,
# YCbCrPositioning. Whatever names a person, a place, a device or a file is dropped.
_KEPT_IFD0 = frozenset((0x010F, 0x0110, 0x011A, 0x011B, 0x0128, 0x0132, 0x0213))
# Exif IFD: exposure (time, f-number, program, ISO and its kinds, shutter, aperture, brightness,
# bias, max aperture, subject distance, metering, light source, flash, focal length, exposure
# index, sensing, mode, white balance, zoom, 35 mm focal length, scene, gain, contrast,
# saturation, sharpness, distance range, focal-plane resolution), date and time (original,
# digitized, offsets, sub-seconds), lens (specification, make, model), format (Exif and
# Flashpix version, components, colour space, pixel size).
_KEPT_EXIF = frozenset((
    0x829A, 0x829D, 0x8822, 0x8827, 0x8830, 0x8831, 0x8832, 0x8833, 0x9201, 0x9202, 0x9203,
    0x9204, 0x9205, 0x9206, 0x9207, 0x9208, 0x9209, 0x920A, 0xA215, 0xA217, 0xA402, 0xA403,
    0xA404, 0xA405, 0xA406, 0xA407, 0xA408, 0xA409, 0xA40A, 0xA40C, 0xA20E, 0xA20F, 0xA210,
    0x9003, 0x9004, 0x9010, 0x9011, 0x9012, 0x9290, 0x9291, 0x9292, 0xA432, 0xA433, 0xA434,
    0x9000, 0xA000, 0x9101, 0xA001, 0xA002, 0xA003, 0xA300, 0xA301, 0xA401))
_STALE_TAGS = {_ORIENTATION, 0x0100, 0x0101, 0xA005}  # orientation, size, Interop pointer
# Bounds on the work one image may cause, beyond its pixels (see "Safe" above). Each is far
# above what cameras and common encoders write, and each keeps the cost of the worst file
# within about twice that of a normal photo with as many pixels.
_MAX_JPEG_SCANS = 100  # libjpeg's progressive JPEGs have 10; every scan is a pass over all blocks
_MAX_PARTS = 512  # JPEG segments; PNG chunks and GIF blocks besides those holding pixels
_MAX_METADATA = 4 * 2**20  # bytes: an ICC profile, EXIF, or all PNG text together, inflated
_MAX_EXIF_ENTRIES = 512  # tags in one EXIF directory (cameras write fewer than 100)
_WINDOW = 64 * 1024  # bytes read at a time while walking a file's structure
_MAX_JUNK = 16 * 1024  # bytes of garbage between JPEG segments or GIF blocks, which Pillow
# skips one by one in Python (1 MB: 0.15 s); a file with more is damaged
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # ends entropy-coded data: not
# stuffing (FF 00), a restart marker (FF D0-D7) or a fill byte (FF FF)
_ANY_MARKER = re.compile(rb"\xff[^\x00\xff]")
_GIF_BLOCK = re.compile(rb"[!,;]")  # extension, image, trailer


class SupportsRead(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


ImageSource: TypeAlias = "bytes | bytearray | memoryview | str | os.PathLike[str] | SupportsRead"


class ImageError(ValueError):
    """The upload is not an image this module can safely process; str() is for people."""

    def __init__(self, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,), {"code": self.code})


@dataclass(frozen=True)
class CompressedImage:
    """The result: ``data`` in ``format``, ``width`` x ``height`` pixels, upright."""

    data: bytes = field(repr=False)
    format: str  # "JPEG", "PNG", "WEBP", "AVIF"; the original's when not changed
    width: int  # pixels
    height: int  # pixels
    changed: bool  # False: data is the original, byte for byte
    original_size: int  # bytes
    original_format: str

    @property
    def size(self) -> int:
        """Length of ``data`` in bytes."""
        return len(self.data)

    @property
    def mime_type(self) -> str:
        return _MIME.get(self.format, ("application/octet-stream", ""))[0]

    @property
    def extension(self) -> str:
        """File name extension with the dot, e.g. ".jpg"."""
        return _MIME.get(self.format, ("", ""))[1]


def input_formats() -> tuple[str, ...]:
    """The formats compress_image() opens, given the installed plugins."""
    _require_pillow()
    from PIL import Image, features

    _register_heif()
    avif = ("AVIF",) if features.check("avif") else ()
    return ("JPEG", "PNG", "WEBP", "GIF", *avif) + (("HEIF",) if "HEIF" in Image.OPEN else ())


def output_formats() -> tuple[str, ...]:
    """The formats compress_image() writes: JPEG, PNG, WEBP, and AVIF when available."""
    _require_pillow()
    from PIL import features

    return ("JPEG", "PNG", "WEBP") + (("AVIF",) if features.check("avif") else ())


def compress_image(
    source: ImageSource,
    *,
    quality: int = DEFAULT_QUALITY,
    max_dimension: int | None = None,  # pixels, long edge
    exact: bool = False,
    format: str | None = None,
    keep_exif: bool = False,
    optimize: bool = True,
    progressive: bool = False,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,  # width x height
) -> CompressedImage:
    """Return ``source`` upright, stripped, shrunk and re-encoded; see the module doc."""
    _check_int("quality", quality, 1, 100)
    if max_dimension is not None:
        _check_int("max_dimension", max_dimension, 1)
    _check_int("max_pixels", max_pixels, 1)
    if len(background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in background):
        raise ValueError(f"background must be an (r, g, b) tuple of 0-255 ints, not {background!r}")
    _require_pillow()
    out_format = None if format is None else format.upper().replace("JPG", "JPEG")
    if out_format is not None and out_format not in output_formats():
        raise ValueError(f"format must be one of {', '.join(output_formats())} or None, "
                         f"not {format!r}")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        fp, original_size = _open_source(source, stack)
        if original_size == 0:
            raise ImageError("The file is empty.", code="empty")
        result = _compress(fp, original_size, quality=quality, max_dimension=max_dimension,
                           exact=exact, out_format=out_format, keep_exif=keep_exif,
                           optimize=optimize, progressive=progressive, background=background,
                           max_pixels=max_pixels)
    logger.debug("compressed %s of %d bytes to %s %dx%d of %d bytes (changed=%s) in %.0f ms",
                 result.original_format, original_size, result.format, result.width,
                 result.height, result.size, result.changed, 1000 * (time.perf_counter() - started))
    return result


def compress_images(
    sources: Iterable[ImageSource], *, workers: int = 2, **options: Any
) -> list[CompressedImage]:
    """compress_image(source, **options) for each source on ``workers`` threads, in order."""
    _check_int("workers", workers, 1)
    calls = [functools.partial(compress_image, source, **options) for source in sources]
    if workers == 1 or len(calls) < 2:
        return [_numbered(i, len(calls), call) for i, call in enumerate(calls)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(workers, len(calls)), thread_name_prefix="uploadguard-images") as pool:
        futures = [pool.submit(call) for call in calls]
        try:
            return [_numbered(i, len(calls), future.result) for i, future in enumerate(futures)]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _numbered(index: int, total: int, call: Callable[[], CompressedImage]) -> CompressedImage:
    try:
        return call()
    except ImageError as exc:
        raise ImageError(f"Image {index + 1} of {total}: {exc.message}", code=exc.code) from exc


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ValueError(f"{name} must be an int {allowed}, not {value!r}")


def _require_pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError as exc:
        raise ImageError(f"Image processing needs Pillow, which is not installed: {_INSTALL_HINT}",
                         code="missing_dependency") from exc


_heif_tried = False


def _register_heif() -> None:
    """Let Pillow open HEIC/HEIF when the optional pillow-heif package is installed."""
    global _heif_tried
    if not _heif_tried:
        _heif_tried = True
        with contextlib.suppress(ImportError):
            importlib.import_module("pillow_heif").register_heif_opener()


def _open_source(source: ImageSource, stack: contextlib.ExitStack) -> tuple[IO[bytes], int]:
    """A seekable binary file for ``source``, and its length in bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return io.BytesIO(data), len(data)
    if isinstance(source, (str, os.PathLike)):
        fp = stack.enter_context(open(source, "rb"))
        return fp, os.fstat(fp.fileno()).st_size
    if not callable(getattr(source, "read", None)) or isinstance(source, io.TextIOBase):
        raise TypeError(f"source must be bytes, a binary file object or a path, "
                        f"not {type(source).__name__}")
    file: Any = source
    try:
        if getattr(file, "seekable", lambda: True)():
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(0)
            return file, int(size)
    except (AttributeError, OSError):
        pass  # not seekable after all: read it into memory
    data = file.read()
    if not isinstance(data, bytes):
        raise TypeError("source.read() must return bytes; open the file in binary mode")
    return io.BytesIO(data), len(data)


def _open_image(fp: IO[bytes], size: int, max_pixels: int) -> Image.Image:
    """Open (not decode) an allowed format and check its pixel count from the header."""
    from PIL import Image, UnidentifiedImageError

    head = fp.read(16)
    fp.seek(0)
    _check_structure(fp, size)
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    formats = ["JPEG", "PNG", "GIF"]  # registered by Pillow's preinit(); load others on demand
    if webp:
        importlib.import_module("PIL.WebPImagePlugin")
        formats.append("WEBP")
    elif head[4:8] == b"ftyp":  # ISO media: AVIF or HEIC
        formats += [name for name in input_formats() if name in ("AVIF", "HEIF")]
        if "AVIF" in formats:
            importlib.import_module("PIL.AvifImagePlugin")
    limit = f"the limit is {max_pixels / 1e6:g} megapixels"
    try:
        im = Image.open(fp, formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own global check fired first (a warning is raised when warnings are errors).
        raise ImageError(f"The image has too many pixels to process; {limit}.",
                         code="too_large") from exc
    except UnidentifiedImageError as exc:
        if webp or head.startswith(_SIGNATURES):
            raise _corrupt(exc) from exc
        names = ", ".join(_NAMES.get(f, f) for f in input_formats())
        raise ImageError(f"The file is not an image in a supported format ({names}).",
                         code="unsupported") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises many types for a damaged header
        raise _corrupt(exc) from exc
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(f"The image is {width}x{height} pixels "
                         f"({width * height / 1e6:.1f} megapixels); {limit}.", code="too_large")
    return im


def _corrupt(exc: BaseException) -> ImageError:
    logger.debug("image rejected as damaged: %r", exc)
    return ImageError("The image file is damaged or incomplete and cannot be read.",
                      code="corrupt")


def _compress(fp: IO[bytes], original_size: int, *, quality: int, max_dimension: int | None,
              exact: bool, out_format: str | None, keep_exif: bool, optimize: bool,
              progressive: bool, background: tuple[int, int, int],
              max_pixels: int) -> CompressedImage:
    from PIL import Image

    im = _open_image(fp, original_size, max_pixels)
    src_format = "JPEG" if im.format == "MPO" else str(im.format)
    original = im.size
    box: tuple[float, float, float, float] | None = None
    _check_metadata(im.info)  # what the header had: before decoding
    try:
        animated = bool(getattr(im, "is_animated", False))  # reads frame headers only
        if max_dimension is not None and src_format == "JPEG":
            box = _draft(im, max_dimension, exact)
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("The image has too many pixels to process.", code="too_large") from exc
    except MemoryError:
        raise
    except Exception as exc:  # truncated data, bad checksums, broken streams ...
        raise _corrupt(exc) from exc
    info = dict(im.info)
    _check_metadata(info)  # again: a PNG may keep some after its pixels
    source_quality = _jpeg_quality(getattr(im, "quantization", None))
    exif = _read_exif(im)
    orientation = exif.get(_ORIENTATION, 1) if exif is not None else 1
    orientation = orientation if isinstance(orientation, int) and orientation in _TRANSPOSE else 1
    cmyk = im.mode == "CMYK"
    im, icc = _normalise_mode(im, info.get("icc_profile") or None)
    if max_dimension is not None:
        im = _shrink(im, original, max_dimension, exact, box)
    resampled = im.size != original
    if orientation != 1:
        im = im.transpose(Image.Transpose[_TRANSPOSE[orientation]])

    has_alpha = im.mode in ("RGBA", "LA") and im.getchannel("A").getextrema()[0] != 255
    if out_format is None:
        out_format = "WEBP" if src_format == "WEBP" else "PNG" if has_alpha else "JPEG"
    if im.mode in ("RGBA", "LA") and (out_format == "JPEG" or not has_alpha):
        im = _flatten(im, background) if has_alpha else im.convert(im.mode[:-1])
    if out_format in ("WEBP", "AVIF") and im.mode in ("L", "LA"):
        im = im.convert("RGB" if im.mode == "L" else "RGBA")
    if icc is not None and icc[16:20] != (b"GRAY" if im.mode in ("L", "LA") else b"RGB "):
        icc = None  # a profile that no longer describes the pixels would shift colours

    params: dict[str, Any] = {"icc_profile": icc} if icc else {}
    private_exif = False
    if keep_exif and exif is not None:
        params["exif"], private_exif = _clean_exif(exif, im.size)
    if out_format == "JPEG":
        if src_format == "JPEG" and not resampled and source_quality is not None:
            quality = min(quality, source_quality)  # more only grows the file, never improves it
        params.update(quality=quality, optimize=optimize, progressive=progressive,
                      subsampling=0 if quality >= 90 else 2)  # 4:4:4 from q90, as libvips
    elif out_format in ("WEBP", "AVIF"):
        params["quality"] = quality
    im.info = {}  # nothing of the source's info may leak into the new file
    data = _encode(im, out_format, params)

    private = _has_private_metadata(info, keep_exif=keep_exif, private_exif=private_exif)
    if resampled or out_format != src_format or animated or cmyk:
        return CompressedImage(data, out_format, im.width, im.height, True, original_size, src_format)
    # The original's own pixels may do: as they are, or losslessly stripped of metadata.
    fp.seek(0)  # (a BytesIO returns its bytes without a copy)
    source = fp.read()
    if (orientation == 1 and not private and len(data) >= original_size
            and _only_harmless_parts(source, src_format, keep_exif=keep_exif)):
        return CompressedImage(source, src_format, *original, False, original_size, src_format)
    kept = _clean_exif(exif, original, orientation)[0] if keep_exif and exif is not None else b""
    if not kept and orientation != 1:
        kept = _orientation_exif(orientation)
    stripped = _stripped(source, src_format, kept, orientation)
    if stripped is not None and len(stripped) <= len(data):
        return CompressedImage(stripped, src_format, im.width, im.height, True,
                               original_size, src_format)
    return CompressedImage(data, out_format, im.width, im.height, True, original_size, src_format)


def _orientation_exif(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    return exif.tobytes()


def _stripped(data: bytes, fmt: str, exif: bytes, orientation: int) -> bytes | None:
    """The original, losslessly, without the parts that may carry something personal.

    JPEG keeps its tables, frame and scans, JFIF (without thumbnail), ICC and Adobe
    segments, and gets a new EXIF block holding ``exif`` (the orientation, which every
    viewer honours, and with keep_exif the allow-listed tags); APPn, comments and bytes
    after the image go. PNG keeps the chunks of ``_PNG_CHUNKS`` and drops text, time,
    EXIF and private chunks; it is only used for a PNG that needs no turn (viewers do not
    all honour a PNG's EXIF orientation). WebP is not stripped: None, the re-encode is used.
    None also when the file holds a part not known to be safe to copy.
    """
    try:
        if fmt == "JPEG":
            return _stripped_jpeg(data, exif)
        if fmt == "PNG" and orientation == 1:
            return _stripped_png(data, exif)
    except (IndexError, ValueError, struct.error):  # broken framing
        pass
    return None


def _stripped_jpeg(data: bytes, exif: bytes) -> bytes | None:
    if len(exif) > 65_533:
        return None  # more than one APP1 segment holds
    jfif, out = b"", list[bytes]()
    for marker, start, length, end in _jpeg_segments(_Window(io.BytesIO(data), len(data))):
        payload = data[start + 4:start + 2 + length]
        if marker == 0xE0 and payload.startswith(b"JFIF\0") and len(payload) >= 14 and not jfif:
            jfif = _segment(0xE0, payload[:12] + b"\0\0")  # without its thumbnail
            continue
        prefix = _JPEG_APPS.get(marker)
        if marker == 0xD9:  # SOI, JFIF, EXIF first; nothing after EOI
            exif_segment = _segment(0xE1, exif) if exif else b""
            return b"".join([b"\xff\xd8", jfif, exif_segment, *out, b"\xff\xd9"])
        if marker in _JPEG_TABLES or prefix is not None and payload.startswith(prefix):
            out.append(data[start:end])
        elif not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            return None  # not an APPn or COM segment: unknown, so not copied blindly
    return None


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _stripped_png(data: bytes, exif: bytes) -> bytes | None:
    out, pos = [data[:8]], 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return None
        if kind in _PNG_CHUNKS:
            out.append(data[pos:end])
        elif not kind[0] & 0x20:
            return None  # a critical chunk (upper-case first letter) this module does not know
        if kind == b"IHDR" and exif:
            tiff = exif[6:] if exif.startswith(b"Exif\0\0") else exif
            out.append(struct.pack(">I", len(tiff)) + b"eXIf" + tiff
                       + struct.pack(">I", zlib.crc32(b"eXIf" + tiff)))
        if kind == b"IEND":
            return b"".join(out)
        pos = end
    return None


def _encode(im: Image.Image, out_format: str, params: dict[str, Any]) -> bytes:
    """``im`` saved as ``out_format``; kept EXIF that cannot be written is dropped."""
    name = _NAMES.get(out_format, out_format)
    limit = _MAX_SIDE.get(out_format)
    if limit is not None and max(im.size) > limit:
        raise ImageError(f"The image is {im.width}x{im.height} pixels; {name} allows at most "
                         f"{limit} pixels a side (shrink it with max_dimension).", code="too_large")
    buffer = io.BytesIO()
    try:
        im.save(buffer, out_format, **params)
    except (OSError, ValueError, RuntimeError) as exc:  # Pillow's encoders raise all three
        if params.get("exif"):
            logger.info("dropping the kept EXIF (%d bytes), which %s cannot hold: %s",
                        len(params["exif"]), name, exc)
            return _encode(im, out_format, {k: v for k, v in params.items() if k != "exif"})
        logger.debug("encoding %s failed: %r", name, exc)
        raise ImageError(f"The image could not be saved as {name}.", code="encode_failed") from exc
    return buffer.getvalue()


def _draft(im: Image.Image, max_dimension: int,
           exact: bool) -> tuple[float, float, float, float] | None:
    """Have libjpeg decode at 1/2, 1/4 or 1/8 scale; return the source box for resize()."""
    size = im.size
    long_edge = max(size)
    scale = 1
    while scale < 8 and math.ceil(long_edge / scale) > max_dimension:
        scale *= 2  # the smallest scale that fits ...
    fitted = math.ceil(long_edge / scale)
    if exact or fitted > max_dimension or fitted < _BOUNDED_FLOOR * max_dimension:
        scale = 8  # ... or the largest that is still at least max_dimension
        while scale > 1 and long_edge // scale < max_dimension:
            scale //= 2
    while scale > 1 and min(size) < scale:
        scale //= 2
    if scale == 1:
        return None
    drafted = im.draft(None, (size[0] // scale, size[1] // scale))
    return None if drafted is None else drafted[1]


def _shrink(im: Image.Image, original: tuple[int, int], max_dimension: int, exact: bool,
            box: tuple[float, float, float, float] | None) -> Image.Image:
    """Bring the (possibly DCT-scaled) image to the bounded or exact size; never enlarge."""
    width, height = original
    if max(width, height) <= max_dimension:
        return im
    scale = max_dimension / max(width, height)
    target = (max_dimension if width >= height else max(1, round(width * scale)),
              max_dimension if height > width else max(1, round(height * scale)))
    long_edge = max(im.size)
    if exact:
        return im if im.size == target else _resize(im, target, box)
    if long_edge <= max_dimension:
        return im  # libjpeg's scaling already landed between 90 and 100 %
    factor = math.ceil(long_edge / max_dimension)
    if math.ceil(long_edge / factor) >= _BOUNDED_FLOOR * max_dimension:
        return im.reduce(factor)
    return _resize(im, target, box)


def _resize(im: Image.Image, size: tuple[int, int],
            box: tuple[float, float, float, float] | None) -> Image.Image:
    """BICUBIC resize; for a large image, two horizontal strips on two threads.

    Pillow releases the GIL while resampling and reads pixels beyond a ``box`` edge,
    so the strips join seamlessly: the same pixels in about half the time.
    """
    from PIL import Image

    bicubic = Image.Resampling.BICUBIC
    if im.width * im.height < _PARALLEL_PIXELS or size[1] < 2:
        return im.resize(size, bicubic, box=box)
    left, top, right, bottom = box or (0, 0, im.width, im.height)
    step = (bottom - top) / size[1]
    middle = size[1] // 2
    parts: dict[int, Image.Image] = {}
    failed: list[BaseException] = []

    def strip(first: int, last: int) -> None:
        try:
            parts[first] = im.resize((size[0], last - first), bicubic,
                                     box=(left, top + first * step, right, top + last * step))
        except BaseException as exc:  # re-raised in the calling thread
            failed.append(exc)

    helper = threading.Thread(target=strip, args=(0, middle), name="uploadguard-resize")
    helper.start()
    strip(middle, size[1])
    helper.join()
    if failed:
        raise failed[0]
    out = Image.new(im.mode, size)
    for first, part in parts.items():
        out.paste(part, (0, first))
    return out


def _read_exif(im: Image.Image) -> Image.Exif | None:
    try:
        exif = im.getexif()  # also reads an XMP tiff:Orientation
    except Exception as exc:  # a malformed EXIF block is dropped, not fatal
        logger.debug("ignoring unreadable EXIF: %r", exc)
        return None
    return exif if len(exif) else None


def _normalise_mode(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """Convert to L, LA, RGB or RGBA; return it with the ICC profile that still applies."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        transparent = mode in ("L", "RGB") and "transparency" in im.info
        return (im.convert(mode + "A") if transparent else im), icc
    if mode == "CMYK":  # Pillow has already undone Adobe's inverted CMYK while decoding
        if icc is not None and icc[16:20] == b"CMYK":
            try:
                from PIL import ImageCms

                srgb = ImageCms.createProfile("sRGB")
                converted = ImageCms.profileToProfile(im, io.BytesIO(icc), srgb, outputMode="RGB")
                if converted is not None:
                    return converted, None
            except Exception as exc:  # no littlecms, or a broken profile: plain conversion
                logger.debug("CMYK profile conversion failed: %r", exc)
        return im.convert("RGB"), None
    if mode.startswith("I"):  # 16-bit greyscale: scale 0-65535 to 0-255, do not clip
        return im.convert("I").point(lambda value: value / 256).convert("L"), icc
    if mode == "1":
        return im.convert("L"), icc
    alpha = mode in ("PA", "RGBa") or im.has_transparency_data
    return im.convert("RGBA" if alpha else "RGB"), icc


def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    from PIL import Image

    red, green, blue = background
    grey = round(0.299 * red + 0.587 * green + 0.114 * blue)
    flat = Image.new(im.mode[:-1], im.size, grey if im.mode == "LA" else background)
    flat.paste(im, mask=im.getchannel("A"))
    return flat


def _clean_exif(exif: Image.Exif, size: tuple[int, int], orientation: int = 1) -> tuple[bytes, bool]:
    """EXIF with only the allow-listed tags, and whether anything personal was removed.

    ``orientation`` other than 1 is written (for the losslessly stripped original, whose
    pixels are not turned); PixelX/YDimension are set to ``size``.
    """
    from PIL import Image

    clean = Image.Exif()
    # IFD1 is the embedded thumbnail: it can show what a crop removed, and it is never copied.
    private = bool(exif.get_ifd(-1))
    for tag in list(exif):
        if tag in _KEPT_IFD0:
            clean[tag] = exif[tag]
        elif tag not in _STALE_TAGS and tag != _EXIF_IFD:
            private = True
    if orientation != 1:
        clean[_ORIENTATION] = orientation
    kept: dict[int, Any] = {}
    for tag, value in exif.get_ifd(_EXIF_IFD).items():
        if tag in _KEPT_EXIF:
            kept[tag] = value
        elif tag not in _STALE_TAGS:
            private = True
    for tag, value in ((0xA002, size[0]), (0xA003, size[1])):  # PixelX/YDimension
        if tag in kept:
            kept[tag] = value
    if kept:
        clean[_EXIF_IFD] = kept
    try:
        return (clean.tobytes() if len(clean) else b""), private
    except Exception as exc:  # a tag Pillow cannot write back: drop EXIF rather than fail
        logger.debug("dropping EXIF that cannot be rewritten: %r", exc)
        return b"", True


def _has_private_metadata(info: dict[Any, Any], *, keep_exif: bool, private_exif: bool) -> bool:
    """Whether Pillow reports metadata that the re-encode drops on purpose."""
    if "exif" in info and (not keep_exif or private_exif):
        return True
    return any(key != "exif" and key not in _HARMLESS_INFO for key in info)  # XMP, IPTC, text ...


def _only_harmless_parts(data: bytes, fmt: str, *, keep_exif: bool) -> bool:
    """Whether every byte of ``data`` lies in a part known to carry nothing personal.

    Pillow skips what it does not know - private PNG chunks, JPEG segments between
    scans, bytes after the end of the image - so the file's own framing is walked.
    Broken framing, an unknown part or a format without a walker gives False.
    """
    walk = {"JPEG": _jpeg_is_harmless, "PNG": _png_is_harmless, "WEBP": _webp_is_harmless}.get(fmt)
    try:
        return walk is not None and walk(data, keep_exif)
    except (IndexError, ValueError):  # a part runs past the end of the file
        return False


def _png_is_harmless(data: bytes, keep_exif: bool) -> bool:
    allowed = (_PNG_CHUNKS | {b"eXIf"}) if keep_exif else _PNG_CHUNKS
    pos, exif_blocks = 8, 0  # after the signature
    while True:
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length  # length, type, data, CRC
        if kind not in allowed or end > len(data) or zlib.crc32(
                memoryview(data)[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return False
        exif_blocks += kind == b"eXIf"
        pos = end
        if kind == b"IEND":
            return pos == len(data) and exif_blocks <= 1


def _jpeg_is_harmless(data: bytes, keep_exif: bool) -> bool:
    exif_blocks = 0
    for marker, start, length, end in _jpeg_segments(_Window(io.BytesIO(data), len(data))):
        if marker == 0xD9:  # EOI
            return end == len(data) and exif_blocks <= 1
        payload = data[start + 4:start + 2 + length]
        prefix = _JPEG_APPS.get(marker)
        if marker == 0xE1 and keep_exif and payload.startswith(b"Exif\0\0"):
            exif_blocks += 1
        elif marker == 0xE0 and payload.startswith(b"JFIF\0"):
            if len(payload) < 14 or payload[12] * payload[13]:
                return False  # a JFIF thumbnail
        elif not (marker in _JPEG_TABLES or prefix is not None and payload.startswith(prefix)):
            return False  # COM, other APPn, anything unknown
    return False


class _Window:
    """Reads a seekable binary file at any offset through one cached block of ``_WINDOW`` bytes.

    The structure walks below read a few bytes per part and search entropy-coded data in
    large steps, in C: a 12 MB JPEG is walked in about 15 ms, in constant memory.
    """

    def __init__(self, fp: IO[bytes], size: int) -> None:
        self.fp, self.size = fp, size
        self.start, self.block = 0, b""

    def read(self, pos: int, count: int) -> bytes:
        """Up to ``count`` bytes from ``pos`` (fewer at the end of the file)."""
        if not (self.start <= pos and pos + count <= self.start + len(self.block)):
            self.fp.seek(pos)
            self.start, self.block = pos, self.fp.read(max(count, _WINDOW))
        return self.block[pos - self.start:pos - self.start + count]

    def search(self, pattern: re.Pattern[bytes], pos: int) -> int:
        """Offset of the first match of a one- or two-byte ``pattern`` from ``pos`` on, or -1."""
        while pos < self.size:
            block = self.read(pos, _WINDOW)
            found = pattern.search(block)
            if found is not None:
                return pos + found.start()
            pos += max(1, len(block) - 1)  # a match may straddle the blocks
        return -1


def _jpeg_segments(window: _Window, resync: bool = False) -> Iterator[tuple[int, int, int, int]]:
    """(marker, start, length, end) of every segment from after SOI up to and including EOI.

    ``start`` is the offset of the marker's 0xFF, ``length`` the segment's length field and
    ``end`` where the next part starts: for SOS after the entropy-coded data that follows it.
    Broken framing raises ValueError; with ``resync`` garbage where a marker belongs is
    skipped, as Pillow and libjpeg do, and given as marker -1.
    """
    pos = 2
    while True:
        head = window.read(pos, 4)
        if len(head) < 2 or head[0] != 0xFF or head[1] == 0:
            if not resync or len(head) < 2:
                raise ValueError(f"no JPEG marker at {pos}")
            following = window.search(_ANY_MARKER, pos + 1)
            if following < 0:
                raise ValueError("no JPEG marker after garbage")
            yield -1, pos, 0, following
            pos = following
            continue
        marker = head[1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker == 0xD9 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # EOI, TEM, RSTn
            yield marker, pos, 0, pos + 2
            if marker == 0xD9:
                return
            pos += 2
            continue
        length = int.from_bytes(head[2:4], "big")
        end = pos + 2 + length
        if len(head) < 4 or length < 2 or end > window.size:
            raise ValueError(f"JPEG segment at {pos} runs past the end")
        if marker == 0xDA:
            end = window.search(_JPEG_MARKER, end)
            if end < 0:
                raise ValueError("JPEG scan runs past the end")
        yield marker, pos, length, end
        pos = end


def _check_structure(fp: IO[bytes], size: int) -> None:
    """Refuse, before Pillow reads it, a file whose structure costs more than its pixels.

    Pillow parses JPEG segments before the first scan, PNG chunks and GIF blocks in Python,
    one by one; libjpeg makes a pass over every block for every scan of a progressive
    JPEG; PNG text is inflated up to 64 MB. Here a walk over the file's framing counts
    them, in C where it matters, and stops at the first bound exceeded. Broken framing is
    left to Pillow, which reports it as damage.
    """
    window = _Window(fp, size)
    head = window.read(0, 16)
    try:
        if head.startswith(b"\xff\xd8\xff"):
            _check_jpeg(window)
        elif head.startswith(b"\x89PNG\r\n\x1a\n"):
            _check_png(window)
        elif head[:6] in (b"GIF87a", b"GIF89a"):
            _check_gif(window)
    except ImageError:
        raise
    except (ValueError, IndexError, struct.error, zlib.error) as exc:
        logger.debug("structure walk stopped: %r", exc)
    finally:
        fp.seek(0)


def _too_many_parts(name: str) -> ImageError:
    return ImageError(f"The image file has too many {name} to process safely.",
                      code="too_many_parts")


def _too_much_metadata(name: str) -> ImageError:
    return ImageError(f"The image's {name} is larger than {_MAX_METADATA // 2**20} MiB.",
                      code="metadata_too_large")


def _check_jpeg(window: _Window) -> None:
    scans = parts = junk = 0
    for marker, start, _length, end in _jpeg_segments(window, resync=True):
        parts += 1
        scans += marker == 0xDA
        if marker == -1 and not scans:  # libjpeg skips garbage after a scan itself, fast
            junk += end - start
            if junk > _MAX_JUNK:
                raise _corrupt(ValueError(f"{junk} bytes of garbage between JPEG segments"))
        if scans > _MAX_JPEG_SCANS:
            raise ImageError(f"The JPEG has more than {_MAX_JPEG_SCANS} scans, too many to "
                             f"decode safely.", code="too_many_scans")
        if parts > _MAX_PARTS:
            raise _too_many_parts("segments")


_PNG_TEXT = {b"tEXt": 0, b"zTXt": 1, b"iTXt": 2, b"iCCP": 1, b"eXIf": 0}  # 1, 2: compressed


def _check_png(window: _Window) -> None:
    width, height = struct.unpack(">II", window.read(16, 8))
    budget = _MAX_PARTS + width * height // 1024  # libpng writes 8 KiB IDAT chunks
    pos, parts, metadata, pixels_seen = 8, 0, 0, False
    while pos + 8 <= window.size:
        length, kind = struct.unpack(">I4s", window.read(pos, 8))
        parts += 1
        if parts > budget:
            raise _too_many_parts("chunks")
        if kind == b"IEND" or kind in (b"fcTL", b"fdAT") and pixels_seen:
            return  # Pillow reads no further than the first frame
        pixels_seen = pixels_seen or kind == b"IDAT"
        style = _PNG_TEXT.get(kind)
        if style is not None:
            if length > _MAX_METADATA:
                raise _too_much_metadata("text and profile")
            metadata += _png_text_size(window.read(pos + 8, length), style,
                                       _MAX_METADATA - metadata)
            if metadata > _MAX_METADATA:
                raise _too_much_metadata("text and profile")
        pos += 12 + length


def _png_text_size(payload: bytes, style: int, limit: int) -> int:
    """Bytes a text, profile or EXIF chunk holds once inflated: at most ``limit`` + 1 inflated."""
    try:
        keyword = payload.index(b"\0")
        if style == 0 or style == 2 and not payload[keyword + 1]:
            return len(payload)
        if style == 2:  # iTXt: keyword, flag, method, language, translated keyword, text
            start = payload.index(b"\0", payload.index(b"\0", keyword + 3) + 1) + 1
        else:
            start = keyword + 2
        return len(zlib.decompressobj().decompress(payload[start:], limit + 1))
    except (ValueError, IndexError, zlib.error):  # Pillow refuses or keeps it as it is
        return len(payload)


def _check_gif(window: _Window) -> None:
    header = window.read(0, 13)
    width, height = struct.unpack("<HH", header[6:10])
    budget = _MAX_PARTS + width * height // 128  # LZW fills 255-byte blocks at <= 1.5 bytes/pixel
    pos = 13 + (3 << ((header[10] & 7) + 1) if header[10] & 0x80 else 0)
    images = blocks = junk = 0
    while True:
        kind = window.read(pos, 1)
        if kind == b"!":  # extension: introducer, label, data blocks
            pos += 2
        elif kind == b",":  # image: descriptor, local palette, LZW code size, data blocks
            images += 1
            if images > 1:
                return  # Pillow reads no further than the start of the second frame
            flags = window.read(pos + 9, 1)[0]
            pos += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        elif kind in (b";", b""):
            return  # the trailer, or the end of the file
        else:  # garbage, which Pillow skips byte by byte
            following = window.search(_GIF_BLOCK, pos)
            junk += (window.size if following < 0 else following) - pos
            if junk > _MAX_JUNK:
                raise _corrupt(ValueError(f"{junk} bytes of garbage between GIF blocks"))
            if following < 0:
                return
            pos = following
            continue
        while True:
            count = window.read(pos, 1)
            if not count:
                return
            blocks += 1
            if blocks > budget:
                raise _too_many_parts("blocks")
            pos += 1 + count[0]
            if not count[0]:
                break


def _check_metadata(info: dict[Any, Any]) -> None:
    """Refuse an ICC profile, XMP or EXIF block that would be slow to parse or copy."""
    for key, name in (("icc_profile", "ICC profile"), ("xmp", "XMP")):
        if len(info.get(key) or b"") > _MAX_METADATA:
            raise _too_much_metadata(name)
    if isinstance(info.get("exif"), bytes):
        _check_exif(info["exif"])


def _check_exif(data: bytes) -> None:
    """Refuse EXIF that would take long to parse: too big, or a directory with too many tags."""
    if len(data) > _MAX_METADATA:
        raise _too_much_metadata("EXIF")
    tiff = data[6:] if data.startswith(b"Exif\0\0") else data
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return  # Pillow will not read it either

    def entries(offset: int) -> list[tuple[int, int]]:
        """(tag, value) of the directory at ``offset``, after checking its size."""
        if not 8 <= offset <= len(tiff) - 2:
            return []
        count = struct.unpack_from(order + "H", tiff, offset)[0]
        if count > _MAX_EXIF_ENTRIES:
            raise _too_much_metadata(f"EXIF ({count} tags in one directory)")
        found = []
        for at in range(offset + 2, min(offset + 2 + 12 * count, len(tiff) - 11), 12):
            tag, _kind, _n, value = struct.unpack_from(order + "HHII", tiff, at)
            found.append((tag, value))
        return found

    first = struct.unpack_from(order + "I", tiff, 4)[0]
    pending, seen = [first], set[int]()
    while pending:  # IFD0, its thumbnail IFD1, and the Exif, GPS and Interop directories
        offset = pending.pop()
        if offset in seen or len(seen) > 8:
            continue
        seen.add(offset)
        found = entries(offset)
        pending += [value for tag, value in found if tag in (_EXIF_IFD, _GPS_IFD, 0xA005)]
        after = offset + 2 + 12 * len(found)
        if offset == first and after + 4 <= len(tiff):
            pending.append(struct.unpack_from(order + "I", tiff, after)[0])


def _webp_is_harmless(data: bytes, keep_exif: bool) -> bool:
    allowed = (_WEBP_CHUNKS | {b"EXIF"}) if keep_exif else _WEBP_CHUNKS
    if int.from_bytes(data[4:8], "little") + 8 != len(data):
        return False  # bytes after the RIFF container, or a truncated one
    pos, exif_blocks, parts = 12, 0, 0  # after RIFF, size, WEBP
    while pos < len(data):
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        parts += 1
        if kind not in allowed or parts > len(_WEBP_CHUNKS) + 1:  # each at most once
            return False
        exif_blocks += kind == b"EXIF"
        pos += 8 + size + size % 2  # chunks are padded to an even length
    return pos == len(data) and exif_blocks <= 1


def _jpeg_quality(quantization: dict[int, Any] | None) -> int | None:
    """Estimate the libjpeg quality a JPEG was saved with from its luminance table."""
    table = (quantization or {}).get(0)
    if table is None or len(table) != 64:
        return None
    scale = 100 * float(sum(table)) / _IJG_LUMA_SUM  # libjpeg's scaling of the table, %
    estimate = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return max(1, min(100, round(estimate)))
