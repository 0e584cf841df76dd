"""``/v1/segment``: images in, detections with masks out."""

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from app.api.auth import ApiToken
from app.api.deps import BatcherDep, SettingsDep, UrlFetcherDep
from app.api.inference import check_image_count, encode_segmentation, run_images
from app.api.responses import OrjsonResponse
from app.api.schemas import (
    ImageSource,
    SegmentationPublic,
    SegmentOptions,
    SegmentRequest,
    error_responses,
)
from app.api.visualize import render_png
from app.errors import BadRequestError
from app.inputs.decoding import decode_all, gather_or_cancel, in_decoder_threads
from app.inputs.memory import RequestMemory
from app.inputs.urlfetch import ByteBudget
from app.serving.predictors import ServedPredictor

router = APIRouter(
    prefix="/v1/segment",
    tags=["segmentation"],
    dependencies=[ApiToken],
    responses=error_responses(400, 413, 415, 422, 503, 504),
)


# the options as form fields: the JSON body's schema, as a form model
FormOptions = Annotated[SegmentOptions, Form()]


def decode_target(predictor: ServedPredictor) -> dict[str, Any]:
    """``decode_all``'s arguments for uploads that ``predictor`` will run: decoded
    to the model's device; for a model in processes of its own, on the CPU
    (``ModelPool.input_device``) or, the JPEGs nvJPEG takes, by the processes on
    their GPU (``ModelPool.decodes_jpeg``); JPEGs larger than the model's input
    reduced as they are decoded."""
    return {
        "device": predictor.input_device,
        "keep_jpeg": predictor.decodes_jpeg,
        "reduce_for": predictor.input_geometry,
    }


@router.post("", name="segment", response_model=SegmentationPublic)
async def segment(
    request: Request,
    images: Annotated[list[UploadFile], File(description="JPEG, PNG, WebP or BMP files")],
    options: FormOptions,
    batcher: BatcherDep,
    settings: SettingsDep,
) -> Response:
    """Segment one or more uploaded images (multipart field `images`)."""
    check_image_count(len(images), settings)
    opts = [options] * len(images)

    async def decode(predictor: ServedPredictor, memory: RequestMemory):
        blobs = [await upload.read() for upload in images]
        names = [upload.filename or f"images[{i}]" for i, upload in enumerate(images)]
        target = decode_target(predictor)
        return await decode_all(
            blobs, names, memory, max_pixels=settings.max_image_pixels, **target
        )

    results = await run_images(request, batcher, settings, decode, opts)
    started_at = request.scope["state"]["started_at"]
    return OrjsonResponse(encode_segmentation(results, started_at))


@router.post("/json", name="segment_json", response_model=SegmentationPublic)
async def segment_json(
    request: Request,
    body: SegmentRequest,
    batcher: BatcherDep,
    settings: SettingsDep,
    fetcher: UrlFetcherDep,
) -> Response:
    """Segment images given as base64 `data` or as an http(s) `url` (public addresses
    only, unless the server's URL_ALLOW_PRIVATE / URL_ALLOWLIST say otherwise)."""
    check_image_count(len(body.images), settings)
    for i, source in enumerate(body.images):  # refuse what will not be fetched, early
        if source.url is None:
            continue
        if not settings.url_fetch:
            raise BadRequestError(
                f"images[{i}]: URL input is disabled on this server (MASKRCNN_URL_FETCH="
                "false); send the file's bytes as base64 in `data`",
                code="url_fetch_disabled",
            )
        fetcher.check_syntax(source.url, f"images[{i}].url")
    opts = [body] * len(body.images)
    budget = ByteBudget(settings.max_upload_bytes)  # all URL images together

    async def read(i: int, source: ImageSource) -> bytes:
        name = f"images[{i}]"
        if source.url is not None:
            return await fetcher.fetch(source.url, name=name, budget=budget)
        return await in_decoder_threads(decode_base64, source.data, f"{name}.data")

    async def decode(predictor: ServedPredictor, memory: RequestMemory):
        blobs = await gather_or_cancel([read(i, s) for i, s in enumerate(body.images)])
        names = [f"images[{i}]" for i in range(len(blobs))]
        target = decode_target(predictor)
        return await decode_all(
            blobs, names, memory, max_pixels=settings.max_image_pixels, **target
        )

    results = await run_images(request, batcher, settings, decode, opts)
    started_at = request.scope["state"]["started_at"]
    return OrjsonResponse(encode_segmentation(results, started_at))


@router.post(
    "/visualize",
    name="segment_visualize",
    response_class=Response,
    responses={
        200: {
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                # the same bytes, for clients (and generators) that take any binary
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "the annotated image (PNG; labelled application/octet-stream "
            "when the request's Accept prefers it)",
        }
    },
)
async def segment_visualize(
    request: Request,
    image: Annotated[UploadFile, File(description="one JPEG, PNG, WebP or BMP file")],
    options: FormOptions,
    batcher: BatcherDep,
    settings: SettingsDep,
) -> Response:
    """The image with masks, boxes, class names and scores drawn on it, as PNG, a
    colour per class; with `mask_format=none`, boxes and labels only."""
    drawn_as = "none" if options.mask_format == "none" else "rle"  # exact masks to draw
    opts = options.model_copy(update={"mask_format": drawn_as})
    decoded = []

    async def decode(predictor: ServedPredictor, memory: RequestMemory):  # here, for the drawing
        blob = await image.read()
        name = image.filename or "image"
        decoded.extend(
            await decode_all([blob], [name], memory, max_pixels=settings.max_image_pixels)
        )  # at full size: the drawing is of the file
        return decoded

    [result] = await run_images(request, batcher, settings, decode, [opts])
    png = await in_decoder_threads(render_png, decoded[0].image, result.result.detections)
    return Response(png, media_type=png_media_type(request.headers.get("accept", "")))


def png_media_type(accept: str) -> str:
    """``image/png``, unless ``Accept`` names ``application/octet-stream`` and not
    ``image/png`` (a generic binary client)."""
    wanted = {part.split(";")[0].strip() for part in accept.split(",")}
    if "application/octet-stream" in wanted and not wanted & {"image/png", "image/*"}:
        return "application/octet-stream"
    return "image/png"


def decode_base64(text: str, name: str) -> bytes:
    """Standard or URL-safe base64, with or without a ``data:...;base64,`` prefix."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    try:
        altchars = b"-_" if "-" in text or "_" in text else None
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{name}: not valid base64", code="invalid_base64") from None
