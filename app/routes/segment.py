"""``/v1/segment``: images in, detections with masks out (SPEC §4)."""

import asyncio
import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from app.auth import ApiToken
from app.dependencies import BatcherDep, PredictorDep, SettingsDep
from app.errors import BadRequestError
from app.images import decode_image, decode_images
from app.inference import check_image_count, encode_segmentation, run_images, to_predict_options
from app.responses import OrjsonResponse
from app.schemas import (
    MaskFormat,
    SegmentationPublic,
    SegmentOptions,
    SegmentRequest,
    error_responses,
)
from app.visualize import render_png

router = APIRouter(
    prefix="/v1/segment",
    tags=["segmentation"],
    dependencies=[ApiToken],
    responses=error_responses(400, 413, 415, 422, 503, 504),
)


def form_options(
    score_threshold: Annotated[float, Form(ge=0, le=1)] = 0.5,
    iou_threshold: Annotated[float, Form(ge=0, le=1)] = 0.5,
    mask_threshold: Annotated[float, Form(ge=0, le=1)] = 0.5,
    max_detections: Annotated[int, Form(ge=0, le=1000)] = 100,
    classes: Annotated[
        list[str] | None,
        Form(description="class names or ids: repeat the field or separate with commas"),
    ] = None,
    mask_format: Annotated[MaskFormat, Form()] = "rle",
) -> SegmentOptions:
    wanted = [c.strip() for field in classes or [] for c in field.split(",") if c.strip()]
    return SegmentOptions(
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        mask_threshold=mask_threshold,
        max_detections=max_detections,
        classes=wanted or None,
        mask_format=mask_format,
    )


FormOptions = Annotated[SegmentOptions, Depends(form_options)]


@router.post("", name="segment", response_model=SegmentationPublic)
async def segment(
    request: Request,
    images: Annotated[list[UploadFile], File(description="JPEG, PNG, WebP or BMP files")],
    options: FormOptions,
    batcher: BatcherDep,
    predictor: PredictorDep,
    settings: SettingsDep,
) -> Response:
    """Segment one or more uploaded images (multipart field `images`)."""
    check_image_count(len(images), settings)
    opts = [to_predict_options(options, predictor.info)] * len(images)

    async def decode():
        blobs = [await upload.read() for upload in images]
        names = [upload.filename or f"images[{i}]" for i, upload in enumerate(images)]
        return await decode_images(blobs, max_pixels=settings.max_image_pixels, names=names)

    results = await run_images(request, batcher, settings, decode, opts)
    started_at = request.scope["state"]["started_at"]
    return OrjsonResponse(encode_segmentation(predictor.info, results, started_at))


@router.post("/json", name="segment_json", response_model=SegmentationPublic)
async def segment_json(
    request: Request,
    body: SegmentRequest,
    batcher: BatcherDep,
    predictor: PredictorDep,
    settings: SettingsDep,
) -> Response:
    """Segment images given as base64 `data` (or `url`, where URL input is enabled)."""
    check_image_count(len(body.images), settings)
    for i, source in enumerate(body.images):
        if source.url is not None:
            raise BadRequestError(
                f"images[{i}]: URL input is not available on this server yet; "
                "send the file's bytes as base64 in `data`",
                code="url_not_supported",
            )
    opts = [to_predict_options(body, predictor.info)] * len(body.images)

    async def decode():
        def one(i: int, text: str):
            data = decode_base64(text, f"images[{i}].data")
            return decode_image(data, max_pixels=settings.max_image_pixels, name=f"images[{i}]")

        tasks = [asyncio.to_thread(one, i, s.data) for i, s in enumerate(body.images)]
        return await asyncio.gather(*tasks)

    results = await run_images(request, batcher, settings, decode, opts)
    started_at = request.scope["state"]["started_at"]
    return OrjsonResponse(encode_segmentation(predictor.info, results, started_at))


@router.post(
    "/visualize",
    name="segment_visualize",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the annotated image",
        }
    },
)
async def segment_visualize(
    request: Request,
    image: Annotated[UploadFile, File(description="one JPEG, PNG, WebP or BMP file")],
    options: FormOptions,
    batcher: BatcherDep,
    predictor: PredictorDep,
    settings: SettingsDep,
) -> Response:
    """The image with masks, boxes, class names and scores drawn on it, as PNG."""
    opts = to_predict_options(options.model_copy(update={"mask_format": "rle"}), predictor.info)
    decoded = []

    async def decode():
        blob = await image.read()
        name = image.filename or "image"
        decoded.append(
            await asyncio.to_thread(
                decode_image, blob, max_pixels=settings.max_image_pixels, name=name
            )
        )
        return decoded

    [result] = await run_images(request, batcher, settings, decode, [opts])
    png = await asyncio.to_thread(render_png, decoded[0], result.result.detections)
    return Response(png, media_type="image/png")


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
