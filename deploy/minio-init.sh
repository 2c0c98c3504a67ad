#!/bin/sh
# One-shot: create the artifact bucket in MinIO (idempotent). Runs in the minio/mc image.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MLFLOW_ARTIFACTS_BUCKET:?}"
for i in $(seq 1 30); do
    if mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1; then
        break
    fi
    echo "waiting for minio ($i/30)"
    sleep 2
done
mc mb --ignore-existing "local/$MLFLOW_ARTIFACTS_BUCKET"
echo "bucket $MLFLOW_ARTIFACTS_BUCKET ready"
