"""Service logging: text (the CLI's rich console on a terminal, plain timestamped lines otherwise)
or one JSON object per line on stderr (``json``).

A JSON line holds ``ts`` (UTC ISO), ``level``, ``logger``, ``msg`` and every ``extra=`` field the
call passed (``job_id``, ``model``, ``version``, ``kind``, ``delivery_id``, ``event``...), plus
``exc`` with the traceback when there is one. Uvicorn's loggers propagate to the same handler.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

from sae_mlops.redact import RedactingFilter

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName", "color_message"}
_PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_QUIET = ("mlflow", "urllib3", "alembic", "git", "matplotlib", "filelock", "httpx", "huggingface_hub", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_service_logging(log_format: str = "text", level: str = "INFO") -> None:
    """Configure the root logger for the service (and its job processes)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    lvl = getattr(logging, level.upper(), logging.INFO)
    if log_format == "json" or not sys.stderr.isatty():
        # JSON lines, or plain timestamped lines when stderr is a file or a container log.
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_PLAIN))
        handler.addFilter(RedactingFilter())  # credentials never reach the log
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        handler._sae_mlops = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    else:
        from sae_mlops.logging_setup import setup_logging

        setup_logging(verbose=lvl <= logging.DEBUG, quiet=lvl >= logging.WARNING)
        # The rich handler hides times unless verbose; a service log needs them.
        for h in logging.getLogger().handlers:
            if getattr(h, "_sae_mlops", False) and hasattr(h, "_log_render"):
                h._log_render.show_time = True
    logging.getLogger("sae_mlops").setLevel(lvl)
    logging.getLogger("uvicorn").setLevel(logging.INFO if lvl <= logging.INFO else lvl)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO if lvl <= logging.INFO else lvl)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
