"""The pixel cap (explainer/data/transforms.py): images are refused from their header, before any decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from explainer.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, decode_rgb, open_image, pixel_cap


@pytest.fixture(autouse=True)
def pils_own_limit_restored():
    """One test below lowers PIL's process-wide limit; other tests in this process keep PIL's."""
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (w, h), 1).save(buf, "PNG")
    return buf.getvalue()


def test_the_default_cap_refuses_a_huge_png_from_its_header(huge_png):
    data = huge_png.read_bytes()
    assert len(data) < 500_000 and DEFAULT_MAX_IMAGE_PIXELS < 12000 * 12000
    header_only = data[:data.index(b"IDAT") + 4]  # no pixel data at all: decoding would fail, not the cap
    for source in (data, header_only, huge_png):
        with pytest.raises(ImageTooLarge, match="12000 x 12000 = 144,000,000 pixels, more than the cap of 89,478,485"):
            decode_rgb(source if isinstance(source, bytes) else source.read_bytes(), 32)
        with pytest.raises(ImageTooLarge):
            open_image(source)


def test_the_cap_can_be_lowered_raised_and_removed():
    data = _png(3000, 1000)
    with pytest.raises(ImageTooLarge, match="3000 x 1000 = 3,000,000 pixels, more than the cap of 2,999,999"):
        decode_rgb(data, 32, max_pixels=2_999_999)
    assert decode_rgb(data, 32, max_pixels=3_000_000).shape == (32, 32, 3)
    assert decode_rgb(data, 32, max_pixels=None).shape == (32, 32, 3)
    with pixel_cap(1_000_000), pytest.raises(ImageTooLarge):  # the shard writer's per-run cap
        open_image(data)
    with open_image(data) as im:  # outside the block: the default again
        assert im.size == (3000, 1000)


def test_raising_the_cap_above_pils_own_limit_works():
    """PIL refuses more than 2 x Image.MAX_IMAGE_PIXELS by itself; a raised cap must win over that."""
    Image.MAX_IMAGE_PIXELS = 1_000_000  # stands for PIL's 89 M default, so that the image stays small
    data = _png(2000, 1500)  # 3 M pixels: PIL alone raises DecompressionBombError
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert np.asarray(decode_rgb(data, 16, max_pixels=4_000_000)).shape == (16, 16, 3)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000  # lifted for that open only
    with pytest.raises(ImageTooLarge, match="more than the cap of 2,000,000"):
        decode_rgb(data, 16, max_pixels=2_000_000)
