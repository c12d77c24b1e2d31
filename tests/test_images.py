"""Tests for uploadguard.images: real Pillow, small images generated in this module."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import pickle
import resource
import struct
import subprocess
import sys
import time
import warnings
import zlib
from typing import Any

import pytest
from PIL import ExifTags, Image, ImageCms, ImageFile, ImageOps, features

from tests.icc import cmyk_profile
from uploadguard.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_QUALITY,
    HIGH_QUALITY,
    CompressedImage,
    ImageError,
    compress_image,
    compress_images,
    input_formats,
    output_formats,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
RED, GREEN, BLUE, YELLOW = (220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 20)


# -- image factories -------------------------------------------------------------------


def quadrants(width: int = 48, height: int = 32) -> Image.Image:
    """An upright test card: red, green on top; blue, yellow below."""
    im = Image.new("RGB", (width, height))
    for box, color in (((0, 0), RED), ((width // 2, 0), GREEN),
                       ((0, height // 2), BLUE), ((width // 2, height // 2), YELLOW)):
        im.paste(color, (*box, box[0] + width // 2, box[1] + height // 2))
    return im


def photo(width: int = 320, height: int = 240) -> Image.Image:
    """Gradients, noise and edges: something that compresses like a photo."""
    base = Image.merge("RGB", [Image.linear_gradient("L").resize((width, height)),
                               Image.radial_gradient("L").resize((width, height)),
                               Image.linear_gradient("L").rotate(90).resize((width, height))])
    noise = Image.merge("RGB", [Image.effect_noise((width, height), 20).convert("L")] * 3)
    im = Image.blend(base, noise, 0.25)
    im.paste(RED, (width // 4, height // 4, width // 2, height // 2))
    return im


def stored_as(upright: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores for ``upright`` with this EXIF orientation (TIFF 6.0 spec).

    Orientation says where the stored row 0 and column 0 are on the upright picture:
    1 top/left, 2 top/right, 3 bottom/right, 4 bottom/left, 5 left/top, 6 right/top,
    7 right/bottom, 8 left/bottom.
    """
    width, height = upright.size
    row0, col0 = {1: ("top", "left"), 2: ("top", "right"), 3: ("bottom", "right"),
                  4: ("bottom", "left"), 5: ("left", "top"), 6: ("right", "top"),
                  7: ("right", "bottom"), 8: ("left", "bottom")}[orientation]
    swapped = orientation >= 5
    stored = Image.new("RGB", (height, width) if swapped else (width, height))
    source = upright.load()
    target = stored.load()
    assert source is not None and target is not None
    for y in range(stored.height):
        for x in range(stored.width):
            if swapped:  # stored rows run along upright columns
                ux = y if row0 == "left" else width - 1 - y
                uy = x if col0 == "top" else height - 1 - x
            else:
                ux = x if col0 == "left" else width - 1 - x
                uy = y if row0 == "top" else height - 1 - y
            target[x, y] = source[ux, uy]
    return stored


def encode(im: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def exif_with(orientation: int | None = None, *, gps: bool = False, serial: bool = False) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon"
    exif[ExifTags.Base.Model] = "EOS R5"
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    sub: dict[int, Any] = {ExifTags.Base.DateTimeOriginal: "2024:05:01 10:00:00",
                           ExifTags.Base.ExifImageWidth: 320, ExifTags.Base.ExifImageHeight: 240}
    if serial:
        sub[ExifTags.Base.BodySerialNumber] = "0123456789"
    exif[ExifTags.IFD.Exif] = sub
    if gps:
        exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}
    return exif.tobytes()


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # dated: make once


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be width x height: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


SECRET = b"GPS 52.52N 13.40E owner=alice"  # what a hidden part of a file may carry


def with_png_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """``png`` with one more chunk just before IEND."""
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + png_chunk(kind, data) + png[iend:]


def jpeg_segment(marker: int, data: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(data) + 2) + data


def riff(chunks: bytes) -> bytes:
    """A WebP file around ``chunks``."""
    return b"RIFF" + struct.pack("<I", len(chunks) + 4) + b"WEBP" + chunks


def webp_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)


def jpeg_parts(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG segment after SOI; a scan ends where its data does."""
    import re

    pos, parts = 2, []
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xDA:
            found = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end)
            assert found is not None
            end = found.start()
        parts.append((data[pos + 1], pos, end))
        pos = end
    return parts


def with_empty_scans(extra: int, size: tuple[int, int] = (1024, 768)) -> bytes:
    """A progressive JPEG with ``extra`` more copies of a luma AC scan that codes nothing.

    Each copy is ~40 bytes (its Huffman table, header, one end-of-band run) and makes
    libjpeg visit every luma block once more: the issue's 169 KiB file with 4,000 of them
    decoded in 5 s.
    """
    data = encode(Image.new("RGB", size, (90, 120, 150)), quality=90, progressive=True)
    parts = jpeg_parts(data)
    for (marker, start, end), (before, table, _) in zip(parts[1:], parts):
        header = data[start + 4:start + 10]  # components, component 1, tables, Ss, Se, Ah/Al
        if marker == 0xDA and before == 0xC4 and header[:2] == b"\x01\x01" and header[3] > 0 \
                and header[5] >> 4 == 0:  # one luma AC band, first pass
            return data[:end] + data[table:end] * extra + data[end:]
    raise AssertionError("no luma AC scan found")


def png_text_bomb(chunks: int) -> bytes:
    """A small PNG with ``chunks`` zTXt chunks of 1 MB of text, ~1 KiB each compressed."""
    ztxt = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 1_000_000, 9))
    png = encode(quadrants(), "PNG")
    idat = png.index(b"IDAT") - 4
    return png[:idat] + ztxt * chunks + png[idat:]


def exif_with_tags(count: int) -> bytes:
    """EXIF whose first directory lists ``count`` SHORT tags: 12 bytes each, slow to parse."""
    entries = b"".join(struct.pack("<HHI", 0x8000 + i % 30_000, 3, 1) + b"\1\0\0\0" for i in range(count))
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, count) + entries + struct.pack("<I", 0)


def colour_photo(width: int = 640, height: int = 480) -> Image.Image:
    """Like photo(), with colour noise: re-encoded at q95 without subsampling it grows."""
    noise = Image.merge("RGB", [Image.effect_noise((width, height), 40).convert("L") for _ in range(3)])
    return Image.blend(photo(width, height), noise, 0.3)


# Originals that come back unchanged when clean: a re-encode would be bigger.
PALETTE_PNG = encode(photo().convert("P"), "PNG")
OPTIMISED_JPEG = encode(photo(), quality=75, optimize=True)
WEBP_WITH_PROFILE = encode(photo(), "WEBP", quality=75, icc_profile=SRGB)


def decoded(result: CompressedImage) -> Image.Image:
    im = Image.open(io.BytesIO(result.data))
    im.load()
    return im


def near(actual: Any, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


# -- tests ----------------------------------------------------------------------------


class TestImport:
    def test_module_imports_without_pillow(self) -> None:
        """Without Pillow the module imports, and a call raises ImageError naming the extra."""
        code = (
            "import sys\n"
            "sys.modules['PIL'] = None\n"
            "import uploadguard.images as images\n"
            "try:\n"
            "    images.compress_image(b'\\xff\\xd8\\xff')\n"
            "except images.ImageError as exc:\n"
            "    print(exc.code, exc)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=60, check=True)
        assert done.stdout.startswith("missing_dependency ")
        assert "pip install 'uploadguard[images]'" in done.stdout

    def test_presets(self) -> None:
        """The quality presets are 85 (default) and 95 (high)."""
        assert (DEFAULT_QUALITY, HIGH_QUALITY) == (85, 95)

    def test_formats(self) -> None:
        """The allow-list opens JPEG, PNG, WebP and GIF; output adds AVIF only when built in."""
        assert input_formats()[:4] == ("JPEG", "PNG", "WEBP", "GIF")
        assert output_formats()[:3] == ("JPEG", "PNG", "WEBP")
        assert ("AVIF" in output_formats()) == features.check("avif")


class TestSources:
    @pytest.mark.parametrize("wrap", [
        pytest.param(bytes, id="bytes"),
        pytest.param(bytearray, id="bytearray"),
        pytest.param(memoryview, id="memoryview"),
        pytest.param(io.BytesIO, id="BytesIO"),
    ])
    def test_in_memory_sources(self, wrap: Any) -> None:
        """bytes-like objects and binary file objects are accepted."""
        data = encode(photo(), quality=95)
        result = compress_image(wrap(data))
        assert result.format == "JPEG" and result.original_size == len(data)

    @pytest.mark.parametrize("as_type", [pytest.param(str, id="str"),
                                         pytest.param(pathlib.Path, id="Path")])
    def test_path(self, tmp_path: pathlib.Path, as_type: Any) -> None:
        """A path (str or os.PathLike) is opened, read and closed."""
        path = tmp_path / "photo.jpg"
        path.write_bytes(encode(photo(), quality=95))
        result = compress_image(as_type(path))
        assert result.changed and result.original_size == path.stat().st_size

    def test_file_is_rewound(self) -> None:
        """A seekable file object is read from the start, whatever its position."""
        stream = io.BytesIO(encode(photo(), quality=95))
        stream.seek(100)
        assert compress_image(stream).width == 320

    def test_unseekable_stream(self) -> None:
        """A stream that cannot seek is read once into memory."""
        data = encode(photo(), quality=95)

        class Pipe(io.RawIOBase):
            def __init__(self) -> None:
                self.inner = io.BytesIO(data)

            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                chunk = self.inner.read(len(buffer))
                buffer[: len(chunk)] = chunk
                return len(chunk)

        assert compress_image(Pipe()).original_size == len(data)

    def test_unchanged_original_from_file(self, tmp_path: pathlib.Path) -> None:
        """The original bytes handed back from a path or file object are the file's bytes."""
        data = encode(photo(), quality=70, optimize=True)
        path = tmp_path / "small.jpg"
        path.write_bytes(data)
        for source in (path, io.BytesIO(data)):
            result = compress_image(source)
            assert not result.changed and result.data == data

    def test_django_uploaded_file(self) -> None:
        """A Django UploadedFile works like any file object, without Django settings."""
        from django.core.files.uploadedfile import SimpleUploadedFile

        upload = SimpleUploadedFile("IMG_0001.JPG", encode(stored_as(quadrants(), 6),
                                    exif=exif_with(6), quality=95), content_type="image/jpeg")
        upload.read(10)
        result = compress_image(upload, max_dimension=40)
        assert (result.width, result.height) == (40, 27)

    def test_text_file_is_refused(self) -> None:
        """A text-mode file is a programming error: TypeError."""
        with pytest.raises(TypeError, match="binary"):
            compress_image(io.StringIO("not bytes"))  # type: ignore[arg-type]

    def test_missing_path(self, tmp_path: pathlib.Path) -> None:
        """A path that does not exist raises FileNotFoundError, not ImageError."""
        with pytest.raises(FileNotFoundError):
            compress_image(tmp_path / "nope.jpg")

    def test_empty(self) -> None:
        """An empty upload is an ImageError with code "empty"."""
        with pytest.raises(ImageError, match="empty") as caught:
            compress_image(b"")
        assert caught.value.code == "empty"


class TestOrientation:
    @pytest.mark.parametrize("orientation", [pytest.param(o, id=f"orientation-{o}")
                                             for o in range(1, 9)])
    def test_applied(self, orientation: int) -> None:
        """Each EXIF orientation 1-8 comes out upright, with the upright size."""
        stored = stored_as(quadrants(), orientation)
        data = encode(stored, exif=exif_with(orientation), quality=95, subsampling=0)
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (48, 32)
        out = decoded(compress_image(data))
        assert out.size == (48, 32)
        for (x, y), color in (((12, 8), RED), ((36, 8), GREEN), ((12, 24), BLUE), ((36, 24), YELLOW)):
            assert near(out.getpixel((x, y)), color), (orientation, (x, y), out.getpixel((x, y)))

    @pytest.mark.parametrize("orientation", [pytest.param(o, id=f"orientation-{o}")
                                             for o in (3, 6, 8)])
    def test_applied_with_resize(self, orientation: int) -> None:
        """Orientation is applied after a (DCT-scaled) shrink: the long edge is bounded, upright."""
        data = encode(stored_as(quadrants(96, 64), orientation), exif=exif_with(orientation),
                      quality=95, subsampling=0)
        out = decoded(compress_image(data, max_dimension=48))
        assert out.size == (48, 32)
        assert near(out.getpixel((12, 8)), RED) and near(out.getpixel((36, 24)), YELLOW)

    def test_png_orientation(self) -> None:
        """A PNG's eXIf orientation is applied too."""
        data = encode(stored_as(quadrants(), 8), "PNG", exif=exif_with(8))
        out = decoded(compress_image(data, format="PNG"))
        assert out.size == (48, 32) and out.getpixel((12, 8)) == RED

    def test_tag_not_left_behind(self) -> None:
        """The Orientation tag is not written again, even when EXIF is kept."""
        data = encode(stored_as(quadrants(), 6), exif=exif_with(6), quality=95)
        out = decoded(compress_image(data, keep_exif=True))
        exif = out.getexif()
        assert ExifTags.Base.Orientation not in exif and exif[ExifTags.Base.Make] == "Canon"
        assert ImageOps.exif_transpose(out).size == (48, 32)

    def test_garbage_orientation_is_ignored(self) -> None:
        """An out-of-range Orientation value is treated as upright."""
        data = encode(quadrants(), exif=exif_with(42), quality=95)
        assert decoded(compress_image(data)).size == (48, 32)


class TestMetadata:
    def test_private_metadata_dropped_profile_kept(self) -> None:
        """By default EXIF, XMP and comments are dropped; the ICC profile is kept byte for byte."""
        data = encode(photo(), quality=95, exif=exif_with(gps=True, serial=True), icc_profile=SRGB,
                      xmp=b"<x:xmpmeta><rdf:RDF/></x:xmpmeta>", comment=b"home address")
        out = decoded(compress_image(data))
        assert out.info.get("icc_profile") == SRGB
        assert not {"exif", "xmp", "comment"} & set(out.info)
        assert not out.getexif()

    def test_keep_exif_drops_gps_and_serials(self) -> None:
        """keep_exif=True keeps camera and date, drops GPS and serial numbers, fixes pixel size."""
        data = encode(photo(), quality=95, exif=exif_with(gps=True, serial=True))
        out = decoded(compress_image(data, keep_exif=True, max_dimension=160))
        exif = out.getexif()
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        assert (exif[ExifTags.Base.Make], exif[ExifTags.Base.Model]) == ("Canon", "EOS R5")
        assert sub[ExifTags.Base.DateTimeOriginal] == "2024:05:01 10:00:00"
        assert ExifTags.IFD.GPSInfo not in exif and not exif.get_ifd(ExifTags.IFD.GPSInfo)
        assert ExifTags.Base.BodySerialNumber not in sub
        assert (sub[ExifTags.Base.ExifImageWidth], sub[ExifTags.Base.ExifImageHeight]) == (160, 120)
        assert "xmp" not in out.info

    def test_keep_exif_is_an_allow_list(self) -> None:
        """keep_exif keeps camera, lens, exposure and dates; who, where and which device go."""
        exif = Image.Exif()
        personal = {ExifTags.Base.Artist: "Alice Example", ExifTags.Base.HostComputer: "alices-macbook",
                    ExifTags.Base.Copyright: "(c) Alice Example", ExifTags.Base.ImageDescription: "our flat",
                    ExifTags.Base.Software: "PhotoTool 1.0 licensed to Alice",
                    ExifTags.Base.XPAuthor: "Alice Example".encode("utf-16-le") + b"\0\0"}
        for tag, value in {ExifTags.Base.Make: "Canon", ExifTags.Base.Model: "EOS R5", **personal}.items():
            exif[tag] = value
        exif[ExifTags.IFD.Exif] = {
            ExifTags.Base.ExposureTime: 0.004, ExifTags.Base.FNumber: 2.8, ExifTags.Base.ISOSpeedRatings: 200,
            ExifTags.Base.DateTimeOriginal: "2024:05:01 10:00:00", ExifTags.Base.FocalLength: 50.0,
            ExifTags.Base.LensModel: "RF50mm F1.8 STM",
            ExifTags.Base.CameraOwnerName: "Alice Example", ExifTags.Base.BodySerialNumber: "0123456789",
            ExifTags.Base.LensSerialNumber: "9876543210", ExifTags.Base.ImageUniqueID: "a" * 32,
            ExifTags.Base.UserComment: b"ASCII\0\0\0at Alice's home"}
        data = encode(photo(), quality=95, exif=exif.tobytes())
        result = compress_image(data, keep_exif=True)
        out = decoded(result).getexif()
        assert set(out) == {ExifTags.Base.Make, ExifTags.Base.Model, ExifTags.IFD.Exif}
        assert set(out.get_ifd(ExifTags.IFD.Exif)) == {
            ExifTags.Base.ExposureTime, ExifTags.Base.FNumber, ExifTags.Base.ISOSpeedRatings,
            ExifTags.Base.DateTimeOriginal, ExifTags.Base.FocalLength, ExifTags.Base.LensModel}
        for secret in (b"Alice", "Alice".encode("utf-16-le"), b"alices-macbook", b"0123456789", b"our flat"):
            assert secret not in result.data

    def test_keep_exif_drops_the_thumbnail(self) -> None:
        """keep_exif=True never keeps the EXIF thumbnail (IFD1), which can show what a crop removed."""
        thumb = encode(Image.new("RGB", (8, 6), "blue"))
        ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 0x0128, 3, 1, 2) + struct.pack("<I", 26)
        ifd1 = (struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, 56)
                + struct.pack("<HHII", 0x0202, 4, 1, len(thumb)) + struct.pack("<I", 0))
        data = encode(photo(), quality=95, exif=b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd0 + ifd1 + thumb)
        assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.IFD1)  # the fixture has one
        result = compress_image(data, keep_exif=True)
        assert thumb not in result.data
        assert not decoded(result).getexif().get_ifd(ExifTags.IFD.IFD1)

    def test_keep_exif_too_big_for_jpeg_dropped(self, caplog: pytest.LogCaptureFixture) -> None:
        """Kept EXIF that a JPEG cannot hold (over 64 KB) is dropped, with an INFO log line."""
        exif = Image.Exif()
        exif[ExifTags.Base.Make] = "Canon"
        exif[ExifTags.Base.Model] = "x" * 70_000  # an allow-listed tag
        data = encode(photo(), "PNG", exif=exif.tobytes())
        with caplog.at_level(logging.INFO, logger="uploadguard"):
            result = compress_image(data, keep_exif=True)
        assert result.format == "JPEG" and not decoded(result).getexif()
        assert any(r.levelno == logging.INFO and "EXIF" in r.getMessage() for r in caplog.records)

    def test_png_text_dropped(self) -> None:
        """PNG text chunks (comments, XMP) are dropped; its ICC profile is kept."""
        from PIL import PngImagePlugin

        text = PngImagePlugin.PngInfo()
        text.add_text("Comment", "taken at home")
        text.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta/>")
        rgba = photo().convert("RGBA")
        rgba.putpixel((0, 0), (0, 0, 0, 0))
        data = encode(rgba, "PNG", pnginfo=text, icc_profile=SRGB)
        result = compress_image(data)
        out = decoded(result)
        assert result.format == "PNG" and result.changed
        assert not {"Comment", "XML:com.adobe.xmp"} & set(out.info)
        assert out.info["icc_profile"] == SRGB

    def test_webp_metadata(self) -> None:
        """WebP keeps its ICC profile and loses EXIF and XMP."""
        data = encode(photo(), "WEBP", quality=95, exif=exif_with(gps=True),
                      icc_profile=SRGB, xmp=b"<x:xmpmeta/>")
        out = decoded(compress_image(data))
        assert out.format == "WEBP" and out.info.get("icc_profile") == SRGB
        assert not out.info.get("exif") and not out.info.get("xmp")


class TestNeverLarger:
    def test_original_handed_back(self) -> None:
        """Nothing to change and no saving: the original bytes come back, changed=False."""
        data = encode(photo(), quality=75, optimize=True)
        result = compress_image(data, quality=DEFAULT_QUALITY)
        assert result.data is data or result.data == data
        assert not result.changed
        assert (result.format, result.width, result.height, result.size) == ("JPEG", 320, 240, len(data))

    def test_smaller_reencode_used(self) -> None:
        """A q95 original re-encoded at q85 is smaller, so the re-encode is used."""
        data = encode(photo(), quality=95)
        result = compress_image(data)
        assert result.changed and result.size < len(data)

    def test_private_metadata_forces_reencode(self) -> None:
        """GPS must go even when that costs bytes; the JPEG is capped at its own quality (q75)."""
        data = encode(photo(), quality=75, exif=exif_with(gps=True))
        result = compress_image(data, quality=HIGH_QUALITY)
        out = decoded(result)
        assert result.changed and not out.getexif()
        reference = encode(photo(), quality=75)  # same pixels, no metadata
        assert sum(Image.open(io.BytesIO(result.data)).quantization[0]) == \
            sum(Image.open(io.BytesIO(reference)).quantization[0])
        assert result.size < len(data)

    def test_rotation_forces_reencode(self) -> None:
        """A photo that needs turning is re-encoded, at no more than its own quality."""
        data = encode(stored_as(photo(), 6), quality=75, exif=exif_with(6))
        result = compress_image(data, quality=HIGH_QUALITY)
        assert result.changed and (result.width, result.height) == (320, 240)
        assert result.size < len(data) * 1.05

    def test_lower_quality_applies_to_resized(self) -> None:
        """The quality cap is only for unresampled pixels: a resize uses the quality asked for."""
        data = encode(photo(640, 480), quality=75)
        result = compress_image(data, max_dimension=320, quality=HIGH_QUALITY)
        table = Image.open(io.BytesIO(result.data)).quantization[0]
        assert sum(table) == sum(Image.open(io.BytesIO(encode(photo(), quality=95))).quantization[0])

    def test_png_palette_kept(self) -> None:
        """A palette PNG that would grow as RGB is handed back."""
        data = encode(quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG")
        result = compress_image(data, format="PNG")
        assert not result.changed and result.data == data

    @pytest.mark.parametrize(("data", "fmt"), [
        pytest.param(with_png_chunk(PALETTE_PNG, b"prVt", SECRET), "PNG", id="png-private-chunk"),
        pytest.param(with_png_chunk(PALETTE_PNG, b"tIME", b"\x07\xe8\x05\x01\x0a\0\0"), "PNG",
                     id="png-time-chunk"),
        pytest.param(PALETTE_PNG + SECRET, "PNG", id="png-after-iend"),
        pytest.param(OPTIMISED_JPEG + SECRET, "JPEG", id="jpeg-after-eoi"),
        pytest.param(encode(photo(), quality=75, optimize=True, comment=SECRET), "JPEG",
                     id="jpeg-comment"),
        pytest.param(OPTIMISED_JPEG[:-2] + jpeg_segment(0xFE, SECRET) + OPTIMISED_JPEG[-2:], "JPEG",
                     id="jpeg-comment-after-scan"),
        pytest.param(OPTIMISED_JPEG[:2] + jpeg_segment(0xEF, SECRET) + OPTIMISED_JPEG[2:], "JPEG",
                     id="jpeg-private-app-segment"),
        pytest.param(riff(WEBP_WITH_PROFILE[12:] + webp_chunk(b"prVt", SECRET)), "WEBP",
                     id="webp-private-chunk"),
        pytest.param(WEBP_WITH_PROFILE + SECRET, "WEBP", id="webp-after-riff"),
    ])
    def test_unknown_parts_never_come_back(self, data: bytes, fmt: str) -> None:
        """Parts Pillow does not report (private chunks, comments, trailing bytes) never return."""
        result = compress_image(data, format=fmt, optimize=False)  # stripped (JPEG, PNG) or re-encoded
        assert result.changed and result.format == fmt and SECRET not in result.data

    @pytest.mark.parametrize(("data", "options"), [
        pytest.param(encode(photo(), quality=75, optimize=True, icc_profile=SRGB), {},
                     id="jpeg-with-profile"),
        pytest.param(encode(photo(), quality=75, optimize=True, progressive=True),
                     {"optimize": False}, id="progressive-jpeg"),
        pytest.param(encode(photo(), quality=75, optimize=True, exif=exif_with()),
                     {"keep_exif": True}, id="jpeg-kept-exif"),
        pytest.param(PALETTE_PNG, {"format": "PNG"}, id="palette-png"),
        pytest.param(WEBP_WITH_PROFILE, {}, id="webp-with-profile"),
    ])
    def test_clean_original_handed_back(self, data: bytes, options: dict[str, Any]) -> None:
        """A file made only of parts known to be harmless still comes back byte for byte."""
        result = compress_image(data, **options)
        assert not result.changed and result.data == data


class TestLosslessOriginal:
    def phone_photo(self, quality: int = 92, **params: Any) -> tuple[Image.Image, bytes]:
        """A photo stored sideways (orientation 6) with GPS, serial number and a comment."""
        upright = colour_photo()
        return upright, encode(stored_as(upright, 6), quality=quality, comment=SECRET,
                               exif=exif_with(6, gps=True, serial=True), **params)

    @pytest.mark.parametrize("quality", [90, 92])
    def test_high_quality_never_larger(self, quality: int) -> None:
        """At HIGH_QUALITY a phone photo whose re-encode would grow comes back no larger, stripped."""
        upright, data = self.phone_photo(quality)
        result = compress_image(data, quality=HIGH_QUALITY)
        assert result.size <= len(data) and result.changed
        out = decoded(result)
        assert SECRET not in result.data and b"0123456789" not in result.data
        exif = out.getexif()
        assert dict(exif) == {ExifTags.Base.Orientation: 6} and not exif.get_ifd(ExifTags.IFD.GPSInfo)
        from PIL import ImageChops

        assert ImageChops.difference(out, Image.open(io.BytesIO(data))).getbbox() is None  # lossless
        assert (result.format, result.width, result.height) == ("JPEG", 640, 480)
        assert ImageOps.exif_transpose(out).size == upright.size  # upright on display

    def test_stripped_original_is_upright(self) -> None:
        """The stripped original's Orientation tag turns it upright in any viewer."""
        upright = colour_photo(320, 240)  # detail that the q95 re-encode would grow on
        for (x, y), color in (((40, 30), RED), ((280, 30), GREEN), ((40, 210), BLUE)):
            upright.paste(color, (x - 20, y - 20, x + 20, y + 20))
        data = encode(stored_as(upright, 6), quality=92, exif=exif_with(6, gps=True))
        result = compress_image(data, quality=HIGH_QUALITY)
        stripped = decoded(result)
        assert result.size <= len(data) and stripped.getexif()[ExifTags.Base.Orientation] == 6
        out = ImageOps.exif_transpose(stripped)
        assert out.size == (320, 240) == (result.width, result.height)
        for (x, y), color in (((40, 30), RED), ((280, 30), GREEN), ((40, 210), BLUE)):
            assert near(out.getpixel((x, y)), color), ((x, y), out.getpixel((x, y)))

    def test_keep_exif_in_stripped_original(self) -> None:
        """With keep_exif the stripped original keeps the allow-listed tags beside the orientation."""
        _, data = self.phone_photo()
        result = compress_image(data, quality=HIGH_QUALITY, keep_exif=True)
        exif = decoded(result).getexif()
        assert result.size <= len(data) and exif[ExifTags.Base.Make] == "Canon"
        assert exif[ExifTags.Base.Orientation] == 6
        assert ExifTags.Base.BodySerialNumber not in exif.get_ifd(ExifTags.IFD.Exif)
        assert not exif.get_ifd(ExifTags.IFD.GPSInfo)

    def test_profile_and_jfif_kept(self) -> None:
        """The ICC profile and JFIF density survive the strip; XMP and APPn segments do not."""
        xmp = b"<x:xmpmeta>" + SECRET + b"</x:xmpmeta>"
        _, data = self.phone_photo(icc_profile=SRGB, xmp=xmp, dpi=(300, 300))
        data = data[:2] + jpeg_segment(0xEF, SECRET) + data[2:]
        result = compress_image(data, quality=HIGH_QUALITY)
        out = decoded(result)
        assert result.size <= len(data) and SECRET not in result.data
        assert out.info["icc_profile"] == SRGB and out.info["dpi"] == (300, 300)

    def test_png_stripped(self) -> None:
        """A PNG with text and private chunks comes back losslessly without them, not as a bigger re-encode."""
        data = with_png_chunk(with_png_chunk(PALETTE_PNG, b"tEXt", b"Comment\0" + SECRET), b"prVt", SECRET)
        result = compress_image(data, format="PNG")
        assert result.changed and result.size < len(data) and SECRET not in result.data
        out = decoded(result)
        assert out.mode == "P" and out.tobytes() == Image.open(io.BytesIO(PALETTE_PNG)).tobytes()

    def test_smaller_reencode_still_wins(self) -> None:
        """When the re-encode is smaller than the stripped original, the re-encode is used."""
        _, data = self.phone_photo(quality=98)
        result = compress_image(data)  # q85
        assert result.size < 0.8 * len(data) and ExifTags.Base.Orientation not in decoded(result).getexif()


class TestBoundedWork:
    """Issue 9, item 4: no file costs much more than a normal photo with as many pixels."""

    def test_jpeg_scans(self) -> None:
        """A progressive JPEG with 1,000 empty scans is refused before decoding: "too_many_scans"."""
        with pytest.raises(ImageError, match="more than 100 scans") as caught:
            compress_image(with_empty_scans(1000))
        assert caught.value.code == "too_many_scans"

    def test_jpeg_scans_up_to_the_limit(self) -> None:
        """100 scans (libjpeg writes 10) are still decoded."""
        data = with_empty_scans(90)
        assert sum(marker == 0xDA for marker, _, _ in jpeg_parts(data)) == 100
        assert compress_image(data).width == 1024

    def test_jpeg_segments(self) -> None:
        """A JPEG of 10,000 empty comment segments (parsed one by one in Python) is refused."""
        data = OPTIMISED_JPEG[:2] + jpeg_segment(0xFE, b"") * 10_000 + OPTIMISED_JPEG[2:]
        with pytest.raises(ImageError) as caught:
            compress_image(data)
        assert caught.value.code == "too_many_parts"

    def test_png_chunks(self) -> None:
        """A PNG of 10,000 empty private chunks is refused: "too_many_parts"."""
        png = encode(quadrants(), "PNG")
        idat = png.index(b"IDAT") - 4
        with pytest.raises(ImageError) as caught:
            compress_image(png[:idat] + png_chunk(b"prVt", b"") * 10_000 + png[idat:])
        assert caught.value.code == "too_many_parts"

    def test_png_chunks_after_odd_text(self) -> None:
        """A text chunk without a keyword (Pillow reads it anyway) does not end the count."""
        png = encode(quadrants(), "PNG")
        idat = png.index(b"IDAT") - 4
        data = png[:idat] + png_chunk(b"tEXt", b"no keyword") + png_chunk(b"prVt", b"") * 10_000 + png[idat:]
        with pytest.raises(ImageError) as caught:
            compress_image(data)
        assert caught.value.code == "too_many_parts"

    @staticmethod
    def with_garbage(fmt: str, size: int) -> bytes:
        if fmt == "JPEG":
            return OPTIMISED_JPEG[:2] + jpeg_segment(0xFE, b"x") + b"\0" * size + OPTIMISED_JPEG[2:]
        gif = encode(quadrants().convert("P"), "GIF")
        start = 13 + 3 * 2 ** ((gif[10] & 7) + 1)  # after the header and global palette
        return gif[:start] + b"\x07" * size + gif[start:]

    @pytest.mark.parametrize("fmt", ["JPEG", "GIF"])
    def test_garbage_between_parts(self, fmt: str) -> None:
        """1 MB of garbage between JPEG segments or GIF blocks (skipped byte by byte by Pillow) is damage."""
        assert compress_image(self.with_garbage(fmt, 1000)).changed  # a little is tolerated, as by Pillow
        with pytest.raises(ImageError, match="damaged") as caught:
            compress_image(self.with_garbage(fmt, 1_000_000))
        assert caught.value.code == "corrupt"

    def test_png_text_inflation(self) -> None:
        """8 KiB of zTXt that inflates to 8 MB (Pillow allows 64 MB) is refused: "metadata_too_large"."""
        data = png_text_bomb(8)
        assert len(data) < 10_000
        with pytest.raises(ImageError, match="larger than 4 MiB") as caught:
            compress_image(data)
        assert caught.value.code == "metadata_too_large"

    def test_png_text_within_limit(self) -> None:
        """3 MB of (inflated) PNG text is within the bound, and dropped."""
        result = compress_image(png_text_bomb(3), format="PNG")
        assert not {"Comment"} & set(decoded(result).info)

    def test_gif_blocks(self) -> None:
        """A GIF comment of 100,000 one-byte blocks (read one by one in Python) is refused."""
        gif = encode(quadrants().convert("P"), "GIF")
        start = 13 + 3 * 2 ** ((gif[10] & 7) + 1)  # after the header and global palette
        with pytest.raises(ImageError) as caught:
            compress_image(gif[:start] + b"\x21\xfe" + b"\x01x" * 100_000 + b"\0" + gif[start:])
        assert caught.value.code == "too_many_parts"

    def test_icc_profile_too_large(self) -> None:
        """An ICC profile over 4 MiB (it would be copied into every output) is refused."""
        data = encode(photo(), quality=90, icc_profile=SRGB + b"\0" * (5 * 2**20))
        with pytest.raises(ImageError, match="ICC profile") as caught:
            compress_image(data)
        assert caught.value.code == "metadata_too_large"

    @pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
    def test_exif_with_too_many_tags(self, fmt: str) -> None:
        """EXIF with 5,000 tags in one directory (0.2 s to parse and copy) is refused."""
        data = encode(quadrants(), fmt, exif=exif_with_tags(5000))
        with pytest.raises(ImageError, match="EXIF") as caught:
            compress_image(data, keep_exif=True)
        assert caught.value.code == "metadata_too_large"

    def test_exif_within_limit(self) -> None:
        """512 tags in a directory are still read."""
        assert compress_image(encode(quadrants(), "PNG", exif=exif_with_tags(512))).changed

    @pytest.mark.parametrize("fmt", ["GIF", "PNG"])
    def test_later_frames_never_read(self, fmt: str) -> None:
        """Only an animation's first frame is read: 500 frames, cut off in the 375th, still give it."""
        frames = [Image.new("RGB", (40, 30), (255 - i % 200, 0, 0)) for i in range(500)]
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=10)
        result = compress_image(data[:len(data) * 3 // 4])  # a frame count costs nothing: no bound
        assert (result.width, result.height) == (40, 30)
        assert near(decoded(result).getpixel((20, 15)), (255, 0, 0), 20)


class TestResize:
    @pytest.mark.parametrize(("fmt", "size", "max_dimension", "exact", "expected"), [
        pytest.param("JPEG", (800, 600), 1000, False, (800, 600), id="never-upscales"),
        pytest.param("JPEG", (800, 600), 400, False, (400, 300), id="dct-half-exactly"),
        pytest.param("JPEG", (800, 600), 410, False, (400, 300), id="bounded-dct-half-within-10pc"),
        pytest.param("JPEG", (800, 600), 410, True, (410, 308), id="exact"),
        pytest.param("JPEG", (800, 600), 300, False, (300, 225), id="bounded-resize-when-dct-too-small"),
        pytest.param("JPEG", (1600, 1200), 210, False, (200, 150), id="bounded-dct-eighth"),
        pytest.param("JPEG", (600, 800), 410, False, (300, 400), id="portrait"),
        pytest.param("PNG", (800, 600), 410, False, (400, 300), id="png-bounded-reduce"),
        pytest.param("PNG", (800, 600), 410, True, (410, 308), id="png-exact"),
        pytest.param("WEBP", (800, 600), 500, False, (500, 375), id="webp-resize"),
    ])
    def test_long_edge(self, fmt: str, size: tuple[int, int], max_dimension: int, exact: bool,
                       expected: tuple[int, int]) -> None:
        """max_dimension bounds the long edge: bounded mode takes a cheap size within 10 %."""
        data = encode(photo(*size), fmt, **({"quality": 95} if fmt != "PNG" else {}))
        result = compress_image(data, max_dimension=max_dimension, exact=exact)
        assert (result.width, result.height) == expected == decoded(result).size

    def test_resize_quality(self) -> None:
        """The DCT-scaled, bounded output is as close to a LANCZOS reference as a BICUBIC resize."""
        from PIL import ImageChops, ImageStat

        source = photo(800, 600)
        data = encode(source, quality=95)
        out = decoded(compress_image(data, max_dimension=400)).convert("RGB")
        reference = Image.open(io.BytesIO(data)).resize(out.size, Image.Resampling.LANCZOS)
        rms = max(ImageStat.Stat(ImageChops.difference(out, reference)).rms)
        assert rms < 6

    def test_large_resize_on_two_threads(self) -> None:
        """A large resize, split over two threads, gives exactly the single-threaded pixels."""
        from PIL import ImageChops

        data = encode(photo(2000, 1200), quality=95)
        out = decoded(compress_image(data, max_dimension=1100, exact=True, format="PNG"))
        reference = Image.open(io.BytesIO(data)).resize((1100, 660), Image.Resampling.BICUBIC)
        assert out.size == (1100, 660)
        assert ImageChops.difference(out.convert("RGB"), reference).getbbox() is None

    @pytest.mark.parametrize("bad", [0, -1, 2.5, "2048", True])
    def test_invalid(self, bad: Any) -> None:
        """A max_dimension that is not a positive int is a ValueError."""
        with pytest.raises(ValueError, match="max_dimension"):
            compress_image(b"x", max_dimension=bad)


class TestModes:
    def transparent(self, mode: str = "RGBA") -> bytes:
        im = photo().convert(mode)
        im.paste((0, 0) if mode == "LA" else (0, 0, 0, 0), (0, 0, 40, 40))
        return encode(im, "PNG")

    def test_alpha_kept_as_png(self) -> None:
        """Visible transparency picks PNG and keeps the alpha channel."""
        result = compress_image(self.transparent())
        out = decoded(result)
        assert (result.format, out.mode) == ("PNG", "RGBA") and out.getpixel((5, 5))[3] == 0

    def test_alpha_flattened_for_jpeg(self) -> None:
        """Asked for JPEG, transparent pixels are flattened on white."""
        out = decoded(compress_image(self.transparent(), format="JPEG"))
        assert out.mode == "RGB" and near(out.getpixel((5, 5)), (255, 255, 255), 8)

    def test_background(self) -> None:
        """The flattening colour is configurable."""
        out = decoded(compress_image(self.transparent(), format="JPEG", background=(0, 0, 255)))
        assert near(out.getpixel((5, 5)), (0, 0, 255), 8)

    def test_opaque_alpha_becomes_jpeg(self) -> None:
        """An alpha channel that is fully opaque is dropped and the photo becomes JPEG."""
        result = compress_image(encode(photo().convert("RGBA"), "PNG"))
        assert (result.format, decoded(result).mode) == ("JPEG", "RGB")

    def test_la(self) -> None:
        """Grey with alpha stays LA in PNG and becomes greyscale JPEG when asked."""
        assert decoded(compress_image(self.transparent("LA"))).mode == "LA"
        out = decoded(compress_image(self.transparent("LA"), format="JPEG"))
        assert out.mode == "L" and out.getpixel((5, 5)) >= 247

    def test_palette_transparency(self) -> None:
        """A GIF with a transparent palette entry becomes an RGBA PNG."""
        im = quadrants().convert("P")
        data = encode(im, "GIF", transparency=im.getpixel((0, 0)))
        result = compress_image(data)
        assert result.format == "PNG" and decoded(result).getpixel((0, 0))[3] == 0

    def test_cmyk(self) -> None:
        """An Adobe (inverted) CMYK JPEG becomes RGB with the right colours."""
        data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), quality=95)
        assert "adobe" in Image.open(io.BytesIO(data)).info
        out = decoded(compress_image(data))
        assert out.mode == "RGB" and near(out.getpixel((32, 32)), (255, 0, 0), 12)

    def test_cmyk_with_profile(self) -> None:
        """A CMYK profile is applied (to sRGB) rather than attached to RGB pixels, or ignored."""
        image = Image.new("CMYK", (64, 64), (0, 255, 255, 0))
        image.paste((0, 0, 0, 255), (0, 0, 32, 64))
        data = encode(image, quality=95, icc_profile=cmyk_profile())
        out = decoded(compress_image(data))
        assert out.mode == "RGB" and "icc_profile" not in out.info
        # tests/icc.py's inks take 80 % (black 50 %) of the light; without the profile red would be (255, 0, 0)
        # and black (0, 0, 0).
        red, green, blue = out.getpixel((48, 32))  # type: ignore[misc]
        assert red > 240 and 25 < green < 70 and 25 < blue < 70, (red, green, blue)
        assert all(100 < value < 150 for value in out.getpixel((16, 32))), out.getpixel((16, 32))  # type: ignore[union-attr]

    def test_sixteen_bit_grey_is_scaled(self) -> None:
        """16-bit greyscale is scaled to 8 bits, not clipped to white."""
        im = Image.new("I;16", (256, 4))
        im.putdata([x * 257 for x in range(256)] * 4)
        out = decoded(compress_image(encode(im, "PNG"), format="PNG"))
        assert out.mode == "L"
        assert [out.getpixel((x, 0)) for x in (0, 64, 128, 255)] == [0, 64, 128, 255]

    def test_one_bit(self) -> None:
        """A 1-bit image becomes 8-bit greyscale."""
        result = compress_image(encode(quadrants().convert("1"), "PNG"), format="JPEG")
        assert decoded(result).mode == "L"

    @pytest.mark.parametrize(("fmt", "expected"), [pytest.param("GIF", "JPEG", id="gif"),
                                                   pytest.param("WEBP", "WEBP", id="webp"),
                                                   pytest.param("PNG", "JPEG", id="apng")])
    def test_animation_first_frame(self, fmt: str, expected: str) -> None:
        """An animation keeps its first frame only."""
        frames = [Image.new("RGB", (40, 30), color) for color in (RED, BLUE, GREEN)]
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
        assert Image.open(io.BytesIO(data)).is_animated
        result = compress_image(data)
        out = decoded(result)
        assert result.format == expected and not getattr(out, "is_animated", False)
        assert near(out.convert("RGB").getpixel((20, 15)), RED, 20)


class TestFormats:
    @pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
    def test_avif_input(self) -> None:
        """An AVIF upload is opened (Pillow's own plugin) and becomes JPEG."""
        result = compress_image(encode(photo(), "AVIF", quality=90))
        assert (result.original_format, result.format) == ("AVIF", "JPEG")

    def test_heic_input(self) -> None:
        """With pillow-heif installed, a HEIC photo is opened, upright, and becomes JPEG."""
        pillow_heif = pytest.importorskip("pillow_heif")
        pillow_heif.register_heif_opener()
        data = encode(stored_as(quadrants(), 6), "HEIF", quality=95, exif=exif_with(6, gps=True))
        result = compress_image(data)
        out = decoded(result)
        assert (result.original_format, result.format, out.size) == ("HEIF", "JPEG", (48, 32))
        assert near(out.getpixel((12, 8)), RED) and not out.getexif()

    @pytest.mark.parametrize(("fmt", "mime", "extension"), [
        pytest.param("jpeg", "image/jpeg", ".jpg", id="jpeg"),
        pytest.param("JPG", "image/jpeg", ".jpg", id="jpg-alias"),
        pytest.param("WEBP", "image/webp", ".webp", id="webp"),
        pytest.param("PNG", "image/png", ".png", id="png"),
        pytest.param("AVIF", "image/avif", ".avif", id="avif", marks=pytest.mark.skipif(
            not features.check("avif"), reason="Pillow built without AVIF")),
    ])
    def test_explicit(self, fmt: str, mime: str, extension: str) -> None:
        """An explicit format is written, with its MIME type and file extension."""
        result = compress_image(encode(photo(), quality=95), format=fmt)
        assert (result.mime_type, result.extension) == (mime, extension)
        assert decoded(result).format == result.format

    def test_unknown(self) -> None:
        """An output format outside JPEG/PNG/WEBP/AVIF is a ValueError."""
        with pytest.raises(ValueError, match="format must be one of"):
            compress_image(b"x", format="BMP")

    @pytest.mark.parametrize("quality", [0, 101, 8.5, None])
    def test_invalid_quality(self, quality: Any) -> None:
        """quality must be an int from 1 to 100."""
        with pytest.raises(ValueError, match="quality"):
            compress_image(b"x", quality=quality)

    def test_high_quality_keeps_colour_resolution(self) -> None:
        """From q90 up JPEG colour is not subsampled (4:4:4); below it is (4:2:0)."""
        from PIL import JpegImagePlugin

        data = encode(photo(), quality=100)
        high = Image.open(io.BytesIO(compress_image(data, quality=HIGH_QUALITY).data))
        default = Image.open(io.BytesIO(compress_image(data).data))
        assert JpegImagePlugin.get_sampling(high) == 0
        assert JpegImagePlugin.get_sampling(default) == 2

    def test_optimize(self) -> None:
        """optimize=False skips Huffman optimisation: a larger JPEG of the same pixels."""
        data = encode(photo(), quality=95)
        assert compress_image(data, optimize=False).size > compress_image(data).size

    def test_progressive(self) -> None:
        """progressive=True writes a progressive JPEG."""
        result = compress_image(encode(photo(), quality=95), progressive=True)
        assert decoded(result).info.get("progressive")

    def test_result(self) -> None:
        """The result is a frozen dataclass whose repr leaves out the bytes."""
        result = compress_image(encode(photo(), quality=95))
        assert "data=" not in repr(result) and result.size == len(result.data)
        with pytest.raises(AttributeError):
            result.width = 1  # type: ignore[misc]


class TestEncoding:
    @pytest.mark.parametrize(("size", "fmt", "limit"), [
        pytest.param((70_000, 2), None, 65_500, id="jpeg"),
        pytest.param((2, 16_384), "WEBP", 16_383, id="webp"),
        pytest.param((32_769, 2), "AVIF", 32_768, id="avif", marks=pytest.mark.skipif(
            not features.check("avif"), reason="Pillow built without AVIF")),
    ])
    def test_too_big_for_format(self, size: tuple[int, int], fmt: str | None, limit: int) -> None:
        """A side longer than the output format allows is refused before encoding."""
        with pytest.raises(ImageError, match=f"at most {limit} pixels a side.*max_dimension") as caught:
            compress_image(encode(Image.new("RGB", size), "PNG"), format=fmt)
        assert caught.value.code == "too_large"

    def test_shrunk_to_fit(self) -> None:
        """With max_dimension within the format's limit the same image is written."""
        result = compress_image(encode(Image.new("RGB", (2, 16_384)), "PNG"), format="WEBP",
                                max_dimension=16_383)
        assert (result.format, result.height) == ("WEBP", 16_383)

    def test_encoder_failure(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Any other encoder failure raises ImageError with code "encode_failed"."""
        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError("encoder error -2")

        data = encode(photo(), quality=95)
        monkeypatch.setattr(Image.Image, "save", fail)
        with pytest.raises(ImageError, match="could not be saved as JPEG") as caught:
            compress_image(data)
        assert caught.value.code == "encode_failed"
        assert isinstance(caught.value.__cause__, OSError)


class TestSafety:
    def test_bomb_fails_fast(self) -> None:
        """A tiny PNG claiming 50000x50000 pixels is refused in milliseconds, allocating nothing."""
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        with pytest.raises(ImageError) as caught:
            compress_image(png_header_only(50_000, 50_000))
        assert time.perf_counter() - started < 0.5
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
        assert caught.value.code == "too_large"

    def test_over_our_limit(self) -> None:
        """Above max_pixels (below Pillow's own limit) the message gives the size and the limit."""
        with pytest.raises(ImageError, match=r"9000x9000 pixels \(81.0 megapixels\); the limit is 80 ") as caught:
            compress_image(png_header_only(9000, 9000))
        assert caught.value.code == "too_large" and DEFAULT_MAX_PIXELS == 80_000_000

    def test_between_limits_with_warnings_ignored(self) -> None:
        """Where Pillow only warns (89-179 MP), the image is still refused."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pytest.raises(ImageError, match="10000x10000"):
                compress_image(png_header_only(10_000, 10_000))

    def test_pillow_warning_as_error(self) -> None:
        """When warnings are errors, Pillow's DecompressionBombWarning still becomes ImageError."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with pytest.raises(ImageError) as caught:
                compress_image(png_header_only(10_000, 10_000))
        assert caught.value.code == "too_large"

    def test_custom_limit(self) -> None:
        """max_pixels is configurable per call."""
        with pytest.raises(ImageError, match="limit is 0.01 megapixels"):
            compress_image(encode(photo()), max_pixels=10_000)

    @pytest.mark.parametrize(("data", "code"), [
        pytest.param(encode(photo(), quality=90)[:2500], "corrupt", id="truncated-jpeg"),
        pytest.param(encode(photo(), quality=90)[:-300], "corrupt", id="truncated-jpeg-tail"),
        pytest.param(encode(photo(), quality=90, progressive=True)[:-300], "corrupt",
                     id="truncated-progressive-jpeg"),
        pytest.param(encode(photo(), "PNG")[:30_000], "corrupt", id="truncated-png"),
        pytest.param(encode(photo(), "WEBP")[:2000], "corrupt", id="truncated-webp"),
        pytest.param(encode(photo().convert("P"), "GIF")[:5000], "corrupt", id="truncated-gif"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt", id="broken-png-header"),
        pytest.param(b"GIF89a" + b"\xff" * 3, "corrupt", id="broken-gif-header"),
        pytest.param(b"\xff\xd8\xff\xe0" + b"\0" * 40, "corrupt", id="broken-jpeg-header"),
        pytest.param(b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 20, "corrupt", id="broken-webp-header"),
        pytest.param(encode(photo(), "BMP"), "unsupported", id="bmp-not-allowed"),
        pytest.param(encode(photo(), "TIFF"), "unsupported", id="tiff-not-allowed"),
        pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported", id="svg"),
        pytest.param(b"%PDF-1.7\n", "unsupported", id="pdf"),
    ])
    def test_bad_files(self, data: bytes, code: str) -> None:
        """Truncated or corrupt files and formats off the allow-list raise ImageError."""
        with pytest.raises(ImageError) as caught:
            compress_image(data)
        assert caught.value.code == code

    def test_corrupt_png_checksum(self) -> None:
        """A PNG whose image data fails its checksum is refused, not decoded half-grey."""
        data = bytearray(encode(photo(), "PNG"))
        data[len(data) // 2] ^= 0xFF
        with pytest.raises(ImageError, match="damaged or incomplete"):
            compress_image(bytes(data))

    def test_no_global_setting_changed(self) -> None:
        """Pillow's process-wide limits are left exactly as they were."""
        before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
        compress_image(encode(photo(), quality=95), max_pixels=10**9, max_dimension=100)
        with pytest.raises(ImageError):
            compress_image(encode(photo(), quality=90)[:2500])
        assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


class TestErrors:
    def test_is_value_error(self) -> None:
        """ImageError is a ValueError with a code and a useful repr, and survives pickling."""
        error = ImageError("The file is empty.", code="empty")
        assert isinstance(error, ValueError)
        assert repr(error) == "ImageError('The file is empty.', code='empty')"
        clone = pickle.loads(pickle.dumps(error))
        assert (str(clone), clone.code) == ("The file is empty.", "empty")

    def test_unsupported_message(self) -> None:
        """The message names the formats a person may upload."""
        with pytest.raises(ImageError, match=r"not an image in a supported format \(JPEG, PNG, WebP, GIF"):
            compress_image(b"hello world, this is text")


class TestBatch:
    def test_in_order_on_threads(self) -> None:
        """compress_images returns results in input order; every image comes out upright."""
        sources = [encode(stored_as(quadrants(), o), exif=exif_with(o), quality=95, subsampling=0)
                   for o in range(1, 9)] * 2
        results = compress_images(sources, workers=4, max_dimension=40)
        assert len(results) == 16
        for result in results:
            out = decoded(result)
            assert out.size == (40, 27) and near(out.getpixel((5, 5)), RED)

    def test_error_names_position(self) -> None:
        """The first failure raises ImageError naming which image failed."""
        good = encode(photo(), quality=95)
        with pytest.raises(ImageError, match="^Image 2 of 3: The file is not an image") as caught:
            compress_images([good, b"nope", good], workers=2)
        assert caught.value.code == "unsupported"

    def test_one_worker(self) -> None:
        """workers=1 runs in the calling thread; options are passed through."""
        results = compress_images([encode(photo(), quality=95)], workers=1, format="PNG")
        assert [r.format for r in results] == ["PNG"]

    def test_invalid_workers(self) -> None:
        """workers must be a positive int."""
        with pytest.raises(ValueError, match="workers"):
            compress_images([], workers=0)
