# One image for every Python service; docker-compose.yml picks the command. Weights ship inside a
# pip package, so nothing is downloaded at run time.
#
# BASE_IMAGE: any Debian-like image with Python 3.11 and its venv module (make compose-test builds
# one with mmdebstrap where registry images cannot be pulled).
# TORCH_INDEX_URL: empty takes torch from PyPI (CUDA build, also runs on a CPU); a CPU-only image
# passes PyTorch's CPU wheel index: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# A virtualenv: Debian's own Python refuses system-wide pip installs (PEP 668); python:3.11-slim does not mind.
RUN python3 -m venv /opt/venv
WORKDIR /app
COPY requirements.txt constraints.txt ./
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements.txt -c constraints.txt
# What the services import (tests/test_container.py walks their imports and checks this list).
COPY shared ./shared
COPY web ./web
COPY worker ./worker
COPY webhooks ./webhooks
COPY models ./models
RUN useradd --create-home --uid 1000 imgsvc
USER imgsvc
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "8", "--worker-class", "gthread", "web.wsgi:app"]
