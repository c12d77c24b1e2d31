"""The demo bounds the work and memory of each photo (issue 9, item 4): a long edge and a pixel cap."""

from __future__ import annotations

import io

import pytest

from tests.test_demo import client, demo_settings, dirs, upload  # noqa: F401  (fixtures)
from tests.test_images import png_header_only

django = pytest.importorskip("django")
PIL_Image = pytest.importorskip("PIL.Image")

from django.test import Client  # noqa: E402


class TestDemoBoundsPhotos:
    def test_long_edge_is_bounded(self, client: Client) -> None:
        """A photo wider than 4096 pixels is stored 4096 wide."""
        out = io.BytesIO()
        PIL_Image.new("RGB", (4200, 300), (90, 120, 150)).save(out, "JPEG", quality=95)
        [stored] = upload(client, "wide.jpg", out.getvalue()).json()["stored"]
        assert (stored["kind"], stored["width"], stored["height"]) == ("image", 4096, 293)

    def test_pixel_count_is_bounded(self, client: Client) -> None:
        """A 60-megapixel image is refused before decoding (50 MP cap) and kept as a plain file."""
        [stored] = upload(client, "huge.png", png_header_only(8000, 7500)).json()["stored"]
        assert stored["kind"] == "file" and "limit is 50 megapixels" in stored["note"]
