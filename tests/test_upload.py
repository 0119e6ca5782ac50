"""The web tier's header checks, without Redis or a worker."""
import pytest

from shared.errors import ServiceError
from tests import images
from web.upload import inspect_image, sniff

MAX_PIXELS = 50_000_000
BAD = images.bad_uploads()
ODD = images.odd_valid_images()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_uploads_are_refused_with_a_stable_code(name):
    data, status, code = BAD[name]
    with pytest.raises(ServiceError) as caught:
        inspect_image(data, MAX_PIXELS)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert len(caught.value.message) > 10


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_but_valid_images_pass_the_header_check(name):
    info = inspect_image(ODD[name], MAX_PIXELS)
    assert info.width >= 1 and info.height >= 1


def test_exif_orientation_swaps_the_reported_size():
    info = inspect_image(images.exif_rotated_jpeg(images.chelsea()), MAX_PIXELS)
    assert (info.width, info.height) == (451, 300)  # upright, although stored as 300x451


def test_pixel_cap_is_configurable():
    with pytest.raises(ServiceError) as caught:
        inspect_image(images.chelsea_jpeg(), max_pixels=1000)
    assert caught.value.code == "too_many_pixels"


def test_non_images_are_described():
    with pytest.raises(ServiceError, match="PDF"):
        inspect_image(BAD["pdf_as_jpg"][0], MAX_PIXELS)
    assert sniff(images.chelsea_jpeg()) == "JPEG"
