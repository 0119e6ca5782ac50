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


def _jpeg_cases() -> dict[str, tuple[bytes, bool]]:
    """JPEGs whose scan data is whole or cut, where markers appear more than once."""
    progressive = images.encode(images.chelsea(), "JPEG", quality=90, progressive=True)
    last_scan = progressive.rfind(b"\xff\xda")
    plain = images.chelsea_jpeg()
    return {"progressive": (progressive, True),
            "progressive_cut_in_its_last_scan": (progressive[:last_scan + 200], False),
            "progressive_cut_before_its_last_scan": (progressive[:last_scan], False),
            "with_bytes_after_its_end": (plain + b"\x00trailer", True),
            "followed_by_a_whole_second_jpeg": (plain + progressive, True),
            "followed_by_a_cut_second_jpeg": (plain + progressive[:len(progressive) // 2], False)}


@pytest.mark.parametrize("name", sorted(_jpeg_cases()))
def test_a_jpeg_passes_only_with_an_end_of_image_after_its_last_scan(name):
    data, whole = _jpeg_cases()[name]
    if whole:
        assert inspect_image(data, MAX_PIXELS).format == "JPEG"
    else:
        with pytest.raises(ServiceError) as caught:
            inspect_image(data, MAX_PIXELS)
        assert caught.value.code == "corrupt_image"
