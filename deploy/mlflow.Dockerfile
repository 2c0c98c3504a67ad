# The MLflow tracking server of the compose stack: MLflow with the PostgreSQL driver (psycopg2) and
# the S3 client (boto3) for MinIO. deploy/mlflow-entrypoint.sh turns the environment into
# `mlflow server` options (basic auth on when MLFLOW_BASIC_AUTH=true).
# Build context: the repository root (docker compose build mlflow).
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" psycopg2-binary boto3 \
    && useradd --create-home --uid 10001 mlflow \
    && mkdir -p /mlflow-auth \
    && chown mlflow /mlflow-auth

COPY deploy/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint.sh
RUN chmod 0755 /usr/local/bin/mlflow-entrypoint.sh

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=10 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MLFLOW_PORT', '5000'), timeout=4)"
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint.sh"]
