# m2fp-api service image (CPU). Weights are not baked in: mount them at /weights.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# CPU-only torch first, pinned, so installing the package cannot pull a CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY src ./src
# the [hub] extra lets the container fetch official weights into /weights when it has network
RUN pip install '.[hub]'

RUN useradd --create-home --uid 10001 m2fp && mkdir -p /weights && chown m2fp /weights
USER m2fp

ENV M2FP_HOST=0.0.0.0 \
    M2FP_PORT=8000 \
    MODELSCOPE_CACHE=/weights \
    M2FP_CACHE_DIR=/weights/m2fp-cache \
    M2FP_MEMORY_BUDGET_MB=2048
VOLUME ["/weights"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"

# SIGTERM drains: queued and running tasks finish (up to M2FP_DRAIN_TIMEOUT_S) before exit
STOPSIGNAL SIGTERM
CMD ["m2fp", "serve"]
