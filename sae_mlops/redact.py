"""Credentials never reach a message or a log line: `redact` masks them in any text.

What is masked (replaced by ``***``):

- the password of a URI's user-info part: ``postgresql://user:pass@host/db`` ->
  ``postgresql://user:***@host/db`` (any scheme, also inside longer text such as a driver's error);
- ``password=...`` / ``pwd=...`` / ``token=...`` / ``secret=...`` pairs of a connection string or a
  query string;
- the values of the secret environment variables the tool and its libraries read
  (`SECRET_ENV_VARS`, plus any variable whose name ends in ``_PASSWORD``, ``_TOKEN``, ``_SECRET``,
  ``_SECRET_KEY`` or ``_API_KEY``), wherever they appear verbatim. Values shorter than 4
  characters are left alone (masking them would garble ordinary words).

`RedactingFilter` applies `redact` to every record a logging handler emits (message, arguments and
the formatted traceback); `sae_mlops.logging_setup` and the service's logging install it, and the
CLI's error line goes through `redact` too. Hand-written (a few regular expressions) because no
maintained library covers URI user-info and environment secrets together.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"

#: secret variables read by the tool, MLflow, the S3 client, the labeler and Ray
SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH", "DATABRICKS_TOKEN",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "SAE_MLOPS_WEBHOOK_SECRET", "RAY_AUTH_TOKEN", "PGPASSWORD", "MYSQL_PWD", "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING", "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)
_SECRET_SUFFIXES = ("_PASSWORD", "_TOKEN", "_SECRET", "_SECRET_KEY", "_API_KEY", "_ACCESS_KEY")
_MIN_SECRET_LEN = 4

# scheme://user:password@  (the password may hold anything but '@', '/' and whitespace)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<pw>[^@/\s'\"]+)(?P<at>@)")
# password=... in connection strings, query strings and driver messages (until a separator)
_PAIR = re.compile(r"(?i)(?P<key>\b(?:password|passwd|pwd|token|secret|api_key|apikey)\s*[=:]\s*)(?P<val>[^\s&;,'\")]+)")


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of the secret variables set in `environ` (default: this process's), longest first."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items()
             if v and len(v) >= _MIN_SECRET_LEN and (k in SECRET_ENV_VARS or k.upper().endswith(_SECRET_SUFFIXES))}
    return sorted(found, key=len, reverse=True)


def redact(text: object, environ: dict[str, str] | None = None) -> str:
    """`text` (made a string) with URI passwords, ``password=`` pairs and secret environment values
    replaced by ``***``."""
    s = str(text)
    if not s:
        return s
    for value in secret_values(environ):
        if value in s:
            s = s.replace(value, MASK)
    s = _USERINFO.sub(lambda m: m.group("head") + MASK + m.group("at"), s)
    return _PAIR.sub(lambda m: m.group("key") + MASK, s)


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in the record's message, arguments and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to the handler
            return True
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            clean_text = redact(text)
            if clean_text != text:  # handlers (rich) render exc_info themselves: give them the masked text
                record.msg = f"{record.msg}\n{clean_text}"
                record.exc_info, record.exc_text = None, None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
