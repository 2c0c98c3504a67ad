"""Keep Hugging Face hub access from hanging when there is no network.

huggingface_hub retries a failed connection five times with exponential back-off (about half a minute)
before giving up. When the hub's host cannot be reached at all, :func:`hub_offline_unless_reachable`
switches huggingface_hub (and transformers, which asks it) to offline mode for the duration of the
call: files already in the local cache still load, anything else fails at once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


def _probe_target() -> tuple[str, int] | None:
    """(host, port) to probe: the HTTPS proxy if one is configured, else the hub endpoint."""
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlparse(proxy if proxy else constants.ENDPOINT)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.hostname, port


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (or the configured proxy) opens within `timeout`."""
    target = _probe_target()
    if target is None:
        return False
    try:
        with socket.create_connection(target, timeout=timeout):
            return True
    except OSError as exc:
        logger.debug("hub probe %s:%s failed: %s", target[0], target[1], exc)
        return False


def hub_is_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``) right now."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


@contextmanager
def hub_offline_unless_reachable() -> Iterator[bool]:
    """Run the body in hub offline mode when the hub cannot be reached; yields whether it is online."""
    from huggingface_hub import constants

    if hub_is_offline():
        yield False
        return
    if hub_reachable():
        yield True
        return
    logger.info("the Hugging Face hub is not reachable: using the local cache only")
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = previous


def hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the hub (or its cache) could not provide the files"."""
    errors: list[type[BaseException]] = [OSError, ConnectionError]
    try:
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    except ImportError:
        pass
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
