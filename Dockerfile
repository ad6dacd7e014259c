# One image for every service and the nightly job (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1
WORKDIR /app

# torch first and pinned (CPU build), so nothing else pulls another (CUDA) build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md* ./
COPY common ./common
COPY trainer ./trainer
COPY services ./services
COPY scripts ./scripts
COPY config ./config
# [ray]: the Ray engine, and `ray start` for the compose profile "ray" (ray-head, ray-worker; docs/scaling.md)
RUN pip install .[ray] \
 && useradd --create-home --uid 10001 app \
 && mkdir -p /data/artifacts /data/run \
 && chown -R app:app /data /app

USER app
# the numba kernels of common/kernels.py, compiled into the image (recompiled at start-up on another CPU)
ENV NUMBA_CACHE_DIR=/app/.numba-cache
RUN python -c "from common import kernels; kernels.warm_up()"
VOLUME ["/data"]
ENV ARTIFACTS_DIR=/data/artifacts RUN_DIR=/data/run HOST=0.0.0.0
EXPOSE 8000 8001 8002
CMD ["python", "-m", "services.recall_server", "serve", "--port", "8000"]
