"""The decode budget's book-keeping (``app.inputs.memory``) and its use by
``decode_all``: a request is admitted or refused whole, from its headers, before
any image is decoded; an ended request's share comes back only when the
decodes it started have really ended, and those it had not started never run."""

import asyncio

import numpy as np
import pytest

from app.errors import PayloadTooLargeError, UnavailableError
from app.inputs import decoding
from app.inputs.decoding import decode_all, probe_image
from app.inputs.memory import DecodeMemory, RequestGone, RequestMemory
from tests.app.conftest import png_bytes


def budget(limit: int = 1000, pixels: int = 100) -> DecodeMemory:
    return DecodeMemory(request_pixels=pixels, limit_bytes=limit)


def test_a_request_is_admitted_or_refused_whole():
    memory = budget()
    first = RequestMemory(memory)
    first.reserve([(600, 200, 50)])
    assert memory.used == 600
    with pytest.raises(UnavailableError, match="MAX_DECODE_MEMORY_MB") as busy:
        RequestMemory(memory).reserve([(300, 100, 10), (200, 50, 10)])
    assert busy.value.code == "busy" and busy.value.headers["Retry-After"] == "1"
    with pytest.raises(PayloadTooLargeError, match="MAX_REQUEST_PIXELS"):
        RequestMemory(memory).reserve([(1, 1, 60), (1, 1, 60)])
    assert memory.used == 600  # the refused took nothing
    first.close()
    assert memory.used == 0


def test_a_decoded_image_holds_its_decoded_bytes_until_its_request_ends():
    memory = budget()
    request = RequestMemory(memory)
    request.reserve([(600, 200, 50), (300, 100, 25)])
    with request.decoding(0):
        assert memory.used == 900
    assert memory.used == 500  # 200 decoded + 300 still to decode
    assert request.close() and memory.used == 0


def test_an_ended_requests_running_decode_keeps_its_share_and_the_rest_never_runs():
    memory = budget()
    request = RequestMemory(memory)
    request.reserve([(600, 200, 50), (300, 100, 25)])
    with request.decoding(0):
        assert not request.close()  # its decode runs on: nothing back yet
        assert memory.used == 900
        with pytest.raises(RequestGone), request.decoding(1):  # not started: it never is
            pass
    assert memory.used == 0


def test_decode_all_decodes_nothing_when_a_header_refuses(monkeypatch):
    decoded = []
    monkeypatch.setattr(decoding, "decode_image", lambda data, **_: decoded.append(data))
    small, large = (
        png_bytes(np.zeros((8, 8, 3), np.uint8)),
        png_bytes(np.zeros((40, 40, 3), np.uint8)),
    )
    memory = RequestMemory(budget(limit=10**6, pixels=10**6))
    with pytest.raises(PayloadTooLargeError, match="images\\[1\\]"):
        asyncio.run(decode_all([small, large], ["images[0]", "images[1]"], memory, max_pixels=1000))
    assert decoded == [] and memory.budget.used == 0


def test_decode_all_reserves_what_the_headers_say_then_keeps_the_decoded_bytes(monkeypatch):
    image = png_bytes(np.zeros((30, 40, 3), np.uint8))
    probe = probe_image(image, max_pixels=10**6)
    assert (probe.width, probe.height, probe.mode) == (40, 30, "RGB")
    memory = RequestMemory(budget(limit=10**6, pixels=10**6))
    reserved = []
    real = decoding.decode_image

    def watched(data, **options):
        reserved.append(memory.budget.used)
        return real(data, **options)

    monkeypatch.setattr(decoding, "decode_image", watched)
    tensors = asyncio.run(decode_all([image, image], ["a", "b"], memory, max_pixels=10**6))
    assert [(tuple(d.image.shape), d.size) for d in tensors] == [((3, 30, 40), None)] * 2
    assert max(reserved) == 2 * probe.decoding_bytes() == 2 * 9 * 1200
    assert memory.budget.used == 2 * 3 * 1200  # decoded, until the request closes
    assert memory.close() and memory.budget.used == 0
