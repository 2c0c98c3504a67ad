# sae-mlops: the registry-triggered analysis service (`sae-mlops serve`); the image also runs the
# analysis commands (docker run IMAGE quick --sae ..., full ...).
# Every package at the version uv.lock pins (requirements-lock.txt is its export for pip; torch the CPU build).
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first (the locked version, e.g. 2.13.0+cpu), from the CPU index, in its own layer (large, rarely changes).
COPY requirements-lock.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep -oE '^torch==[^ ;]+' requirements-lock.txt)"

# Then every other locked package, then the package itself (--no-deps: nothing beyond the lock).
# mlflow matches the server image: a different MLFLOW_VERSION than the lock's conflicts here, loudly.
RUN pip install -r requirements-lock.txt "mlflow==${MLFLOW_VERSION}"
COPY pyproject.toml README.md ./
COPY sae_mlops ./sae_mlops
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 sae \
    && mkdir -p /data \
    && chown sae /data

USER sae
ENV SAE_MLOPS_HOST=0.0.0.0 \
    SAE_MLOPS_PORT=8080 \
    SAE_MLOPS_DATA_DIR=/data \
    SAE_MLOPS_LOG_FORMAT=json \
    HF_HOME=/data/hf-cache
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SAE_MLOPS_PORT', '8080'), timeout=4)"
ENTRYPOINT ["sae-mlops"]
CMD ["serve"]
