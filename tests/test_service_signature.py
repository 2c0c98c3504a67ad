"""Webhook signature verification against MLflow's own signer."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature
from starlette.datastructures import Headers

from sae_mlops.service.signature import SignatureError, sign, verify

SECRET = "s3cret"
BODY = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}})


def _headers(delivery_id="d-1", ts=None, secret=SECRET, body=BODY, signature=None):
    ts = str(int(time.time()) if ts is None else ts)
    return {
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": signature or _generate_hmac_signature(secret, delivery_id, ts, body),
    }


def test_our_signer_matches_mlflows():
    assert sign(SECRET, "abc", "123", BODY) == _generate_hmac_signature(SECRET, "abc", "123", BODY)
    assert sign(SECRET, "abc", 123, BODY.encode()) == _generate_hmac_signature(SECRET, "abc", "123", BODY)


def test_valid_delivery_is_accepted():
    now = time.time()
    d = verify(_headers(ts=int(now)), BODY.encode(), SECRET, 300, now=now)
    assert d.delivery_id == "d-1" and d.timestamp == int(now)


def test_headers_are_case_insensitive():
    h = {k.lower(): v for k, v in _headers().items()}
    assert verify(h, BODY.encode(), SECRET).delivery_id == "d-1"
    assert verify(Headers(h), BODY.encode(), SECRET).delivery_id == "d-1"


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda h, b: (h, b + b" "), "bad_signature"),  # body changed after signing
        (lambda h, b: ({**h, "X-MLflow-Delivery-Id": "other"}, b), "bad_signature"),  # id swapped
        (lambda h, b: ({**h, "X-MLflow-Signature": "v1,AAAA"}, b), "bad_signature"),
        (lambda h, b: ({**h, "X-MLflow-Signature": "v2," + h["X-MLflow-Signature"][3:]}, b), "bad_signature"),
        (lambda h, b: ({**h, "X-MLflow-Signature": h["X-MLflow-Signature"][3:]}, b), "bad_signature"),  # no version
        (lambda h, b: ({k: v for k, v in h.items() if k != "X-MLflow-Signature"}, b), "missing_headers"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "X-MLflow-Timestamp"}, b), "missing_headers"),
        (lambda h, b: ({**h, "X-MLflow-Timestamp": "yesterday"}, b), "bad_timestamp"),
    ],
)
def test_tampered_or_incomplete_deliveries_are_refused(mutate, reason):
    headers, body = mutate(_headers(), BODY.encode())
    with pytest.raises(SignatureError) as e:
        verify(headers, body, SECRET)
    assert e.value.reason == reason


def test_wrong_secret_is_refused():
    with pytest.raises(SignatureError) as e:
        verify(_headers(secret="other"), BODY.encode(), SECRET)
    assert e.value.reason == "bad_signature"


@pytest.mark.parametrize("offset", [-301, 301, -86400])
def test_timestamps_outside_the_window_are_refused(offset):
    now = 1_800_000_000.0
    with pytest.raises(SignatureError) as e:
        verify(_headers(ts=int(now) + offset), BODY.encode(), SECRET, 300, now=now)
    assert e.value.reason == "stale_timestamp"


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamps_inside_the_window_are_accepted(offset):
    now = 1_800_000_000.0
    assert verify(_headers(ts=int(now) + offset), BODY.encode(), SECRET, 300, now=now)


def test_one_of_several_signatures_may_match():
    h = _headers()
    h["X-MLflow-Signature"] = "v1,bm90LWl0 " + h["X-MLflow-Signature"]  # rotation: old and new secret
    assert verify(h, BODY.encode(), SECRET).delivery_id == "d-1"


def test_a_forged_stale_delivery_reports_the_signature():
    # Without the secret, nothing about the timestamp is revealed.
    with pytest.raises(SignatureError) as e:
        verify(_headers(secret="x", ts=1), BODY.encode(), SECRET)
    assert e.value.reason == "bad_signature"
