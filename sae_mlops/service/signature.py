"""MLflow webhook signatures (MLflow 3.3+, Standard-Webhooks style).

MLflow sends three headers with each delivery:

- ``X-MLflow-Delivery-Id``: a UUID, unique per delivery (the same on MLflow's own HTTP retries);
- ``X-MLflow-Timestamp``: Unix seconds when the delivery was made;
- ``X-MLflow-Signature``: ``v1,`` + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{raw_body}")).

`verify` checks all three against the raw request body: the signature with a constant-time
comparison (several space-separated ``v1,...`` signatures are accepted, as in Standard Webhooks),
and the timestamp against a tolerance window either side of now. Replays inside the window are
refused by the delivery log (`sae_mlops.service.queue`), which remembers ids for longer than the window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Mapping

DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"
MAX_DELIVERY_ID_LENGTH = 200


class SignatureError(Exception):
    """A delivery that must be refused; `reason` is a short machine-readable word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedDelivery:
    delivery_id: str
    timestamp: int


def sign(secret: str, delivery_id: str, timestamp: str | int, body: bytes | str) -> str:
    """The ``X-MLflow-Signature`` value MLflow would send for this delivery."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    signed = f"{delivery_id}.{timestamp}.".encode("utf-8") + raw
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> VerifiedDelivery:
    """Check a delivery's headers and body; return its id and timestamp or raise SignatureError.

    headers: a case-insensitive mapping (Starlette's Headers) or a plain dict.
    """
    get = _getter(headers)
    delivery_id = (get(DELIVERY_ID_HEADER) or "").strip()
    ts_raw = (get(TIMESTAMP_HEADER) or "").strip()
    sig_raw = (get(SIGNATURE_HEADER) or "").strip()
    if not delivery_id or not ts_raw or not sig_raw:
        missing = [h for h, v in ((DELIVERY_ID_HEADER, delivery_id), (TIMESTAMP_HEADER, ts_raw), (SIGNATURE_HEADER, sig_raw)) if not v]
        raise SignatureError("missing_headers", f"missing header(s): {', '.join(missing)}")
    if len(delivery_id) > MAX_DELIVERY_ID_LENGTH:
        raise SignatureError("bad_delivery_id", "delivery id too long")
    try:
        timestamp = int(ts_raw)
    except ValueError:
        raise SignatureError("bad_timestamp", f"timestamp {ts_raw[:40]!r} is not Unix seconds") from None

    expected = sign(secret, delivery_id, ts_raw, body).split(",", 1)[1].encode("ascii")
    matched = False
    for candidate in sig_raw.split():
        version, _, value = candidate.partition(",")
        if version != SIGNATURE_VERSION or not value:
            continue
        # compare_digest on bytes of possibly different length is still constant-time in the content.
        if hmac.compare_digest(value.encode("ascii", "replace"), expected):
            matched = True
    if not matched:
        raise SignatureError("bad_signature", "signature does not match")

    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureError(
            "stale_timestamp", f"timestamp is {current - timestamp:+.0f}s from now (tolerance {tolerance_s:.0f}s)"
        )
    return VerifiedDelivery(delivery_id=delivery_id, timestamp=timestamp)


def _getter(headers: Mapping[str, str]):
    if hasattr(headers, "getlist") or type(headers).__name__ == "Headers":
        return headers.get  # already case-insensitive
    lowered = {str(k).lower(): v for k, v in headers.items()}
    return lambda name: lowered.get(name.lower())
