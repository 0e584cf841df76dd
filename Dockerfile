# syntax=docker/dockerfile:1
#
# maskrcnn-service. One container serves one GPU with one uvicorn
# process: scale with replicas (docker-compose.yml, docs/deploy.md), not with
# workers inside a container.
#
#   docker build -t maskrcnn-service .
#   docker run --gpus 1 -p 8000:8000 maskrcnn-service
#
# Both stages start from the same CUDA PyTorch runtime image, so the project's
# virtual environment reuses its torch and torchvision (--system-site-packages)
# instead of downloading another 2 GB of them, and the venv's interpreter path
# is the same in both.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/opt/torch

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY model ./model

# Not editable: the package is copied into the venv, the source stays behind.
RUN python -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir .

# The import check runs outside /src, so it imports what was installed (a module
# missing from the wheel fails the build), not the source tree beside it.
WORKDIR /
RUN /opt/venv/bin/python -c "import app, torch, torchvision, app.cli, app.main, model.loading; \
assert not app.__file__.startswith('/src/'), app.__file__" \
    && /opt/venv/bin/maskrcnn --help >/dev/null

# COCO weights baked in (this is the only step that needs the network): the
# container starts offline and never falls back to the demo model.
RUN /opt/venv/bin/maskrcnn download coco


FROM ${BASE_IMAGE}

ARG APP_UID=10001

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch \
    MASKRCNN_MODEL=coco \
    MASKRCNN_DATA_DIR=/data \
    MASKRCNN_HOST=0.0.0.0

# A fixed uid, so files on the shared `data` volume have the same owner in
# every replica and in the worker.
RUN groupadd --system --gid ${APP_UID} maskrcnn \
    && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin maskrcnn \
    && mkdir -p /data \
    && chown ${APP_UID}:${APP_UID} /data

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=${APP_UID}:${APP_UID} /opt/torch /opt/torch

# Not /data: the settings' .env file is read from here, never from the volume
# that clients' uploads land in.
WORKDIR /srv/maskrcnn
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
VOLUME ["/data"]

# /readyz is 200 once the model is loaded and warmed up, 503 while loading or
# draining. The start period covers reading the weights and the CUDA warm-up.
# Python, because the runtime image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# Exec form: maskrcnn is PID 1 and gets SIGTERM itself (graceful drain).
ENTRYPOINT ["maskrcnn"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
