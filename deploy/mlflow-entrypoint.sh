#!/bin/sh
# Starts `mlflow server` from the environment (see docker-compose.yml and .env.example):
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://user:password@postgres:5432/db
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket (MinIO via MLFLOW_S3_ENDPOINT_URL + AWS_* keys);
#                                 artifacts are proxied (--serve-artifacts): clients need no S3 keys
#   MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted (the compose service name included)
#   MLFLOW_BASIC_AUTH=true        adds --app-name basic-auth; users in MLFLOW_AUTH_DATABASE_URI
#                                 (default sqlite:////mlflow-auth/basic_auth.db), admin
#                                 MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, and
#                                 MLFLOW_FLASK_SERVER_SECRET_KEY set.
# Webhooks: MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS, MLFLOW_WEBHOOK_ALLOWED_SCHEMES and
# MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY are read by MLflow itself.
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION}"
: "${MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY:?set MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY (a Fernet key; every worker must share it)}"
if ! python -c "import os; from cryptography.fernet import Fernet; Fernet(os.environ['MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY'])" 2>/dev/null; then
    echo "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY is not a Fernet key; generate one with:" >&2
    echo "  python -c \"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())\"" >&2
    exit 2
fi

set -- mlflow server \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --serve-artifacts \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host 0.0.0.0 \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}"

if [ -n "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]; then
    set -- "$@" --allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS"
fi

case "${MLFLOW_BASIC_AUTH:-false}" in
    true|1|yes)
        : "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD when MLFLOW_BASIC_AUTH=true}"
        : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY when MLFLOW_BASIC_AUTH=true}"
        config=/mlflow-auth/basic_auth.ini
        cat > "$config" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:////mlflow-auth/basic_auth.db}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
        export MLFLOW_AUTH_CONFIG_PATH="$config"
        set -- "$@" --app-name basic-auth
        ;;
esac

exec "$@"
