"""Service settings: defaults < config file (YAML, TOML or JSON) < environment < command-line options.

The file holds the keys below (lower case, as in `Settings`); it may also hold the policy inline
under ``policy:`` instead of naming a ``policy_file``. Every key has an environment variable:
``SAE_MLOPS_<KEY>`` (``SAE_MLOPS_PORT``, ``SAE_MLOPS_WEBHOOK_SECRET``...), except the tracking URI,
which is MLflow's own ``MLFLOW_TRACKING_URI``. ``SAE_MLOPS_CONFIG`` names the file when ``--config``
is not given.

The webhook secret may come from ``webhook_secret`` or from a file (``webhook_secret_file``, e.g. a
Docker secret); the service refuses to start without one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from sae_mlops.errors import InputError

ENV_PREFIX = "SAE_MLOPS_"
CONFIG_ENV = "SAE_MLOPS_CONFIG"
WEBHOOK_PATH = "/webhooks/mlflow"
LOG_FORMATS = ("text", "json")


@dataclass
class Settings:
    """Everything `sae-mlops serve` can be told.

    tracking_uri: the MLflow tracking server (None: MLflow's default, i.e. ``MLFLOW_TRACKING_URI``).
    host / port: where the webhook receiver listens.
    data_dir: the queue database, job specs, logs and outputs (``queue.db``, ``jobs/<id>/``).
    webhook_secret / webhook_secret_file: the HMAC secret shared with the MLflow webhook.
    webhook_tolerance_s: deliveries whose timestamp is further than this from now are refused;
        delivery ids are remembered at least twice this long (replays are refused).
    webhook_url: when set, the service creates (or updates) an MLflow webhook named
        `webhook_name` pointing at this URL, with the secret and the events the policy listens to.
    policy_file: the policy (YAML/JSON); None: the inline ``policy`` of the config file, else the
        default policy (quick analysis of every new version).
    devices: one worker per device (``auto``, ``cpu``, ``cuda:0``...); each runs one job at a time.
    max_attempts: attempts per job before it is marked failed; retry_backoff_s doubles per attempt
        up to retry_backoff_max_s.
    quick_timeout_s / full_timeout_s: a job running longer is killed (and retried).
    reconcile_interval_s: seconds between registry scans (the first runs at start); 0: only at start.
    experiment: MLflow experiment of the analysis runs.
    keep_outputs: keep each job's local output directory after its files are logged to MLflow.
    log_format: ``text`` (rich console) or ``json`` (one JSON object per line on stderr).
    """

    tracking_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("sae-mlops-service")
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_secret_file: Path | None = None
    webhook_tolerance_s: float = 300.0
    webhook_url: str | None = None
    webhook_name: str = "sae-mlops"
    policy_file: Path | None = None
    policy: dict[str, Any] | None = None
    devices: list[str] = field(default_factory=lambda: ["auto"])
    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    retry_backoff_max_s: float = 1800.0
    quick_timeout_s: float = 3600.0
    full_timeout_s: float = 21600.0
    reconcile_interval_s: float = 300.0
    experiment: str = "sae-mlops-service"
    keep_outputs: bool = False
    log_format: str = "text"
    log_level: str = "INFO"
    worker_poll_s: float = 2.0

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.db"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def timeout_for(self, kind: str) -> float:
        return self.full_timeout_s if kind == "full" else self.quick_timeout_s

    def secret(self) -> str:
        """The webhook secret (from the setting, else the secret file)."""
        if self.webhook_secret:
            return self.webhook_secret
        if self.webhook_secret_file is not None:
            try:
                value = Path(self.webhook_secret_file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise InputError(
                    f"The webhook secret file {self.webhook_secret_file} cannot be read ({e.strerror}); "
                    "fix SAE_MLOPS_WEBHOOK_SECRET_FILE or set SAE_MLOPS_WEBHOOK_SECRET."
                ) from None
            if value:
                return value
        raise InputError(
            "No webhook secret is configured; set SAE_MLOPS_WEBHOOK_SECRET (or webhook_secret in the "
            "config file) to the secret of the MLflow webhook."
        )

    def public_dict(self) -> dict[str, Any]:
        """The settings without the secret, for logs and the health endpoint."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("webhook_secret", "policy"):
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        out["webhook_secret"] = "set" if (self.webhook_secret or self.webhook_secret_file) else "missing"
        return out


_FIELDS = {f.name: f for f in fields(Settings)}
_ENV_SKIP = ("tracking_uri", "policy")


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, the config file, the environment and `overrides` (in that order).

    config_file: None -> ``$SAE_MLOPS_CONFIG`` if set. `overrides` holds command-line values; None
    entries are ignored. Bad values raise InputError naming the key and where it came from.
    """
    env = os.environ if environ is None else environ
    values: dict[str, tuple[Any, str]] = {}
    path = config_file if config_file is not None else env.get(CONFIG_ENV) or None
    if path is not None:
        for k, v in read_config_file(Path(path)).items():
            values[k] = (v, f"{path}")
    for name in _FIELDS:
        if name in _ENV_SKIP:
            continue
        key = ENV_PREFIX + name.upper()
        if env.get(key, "") != "":
            values[name] = (env[key], f"${key}")
    if env.get("MLFLOW_TRACKING_URI"):
        values["tracking_uri"] = (env["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI")
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = (v, f"the --{k.replace('_', '-')} option")

    kwargs: dict[str, Any] = {}
    for name, (raw, origin) in values.items():
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise InputError(f"Unknown setting {name!r} in {origin}; known settings: {known}.")
        kwargs[name] = _coerce(name, raw, origin)
    settings = Settings(**kwargs)
    _validate(settings)
    return settings


def read_config_file(path: Path) -> dict[str, Any]:
    """A mapping from a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"The config file {path} cannot be read ({e.strerror}); check the path given to --config.") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise InputError(f"The config file {path} is not valid {suffix.lstrip('.') or 'YAML'} ({e}); fix its syntax.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"The config file {path} must hold a mapping of settings, not {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, raw: Any, origin: str) -> Any:
    def bad(expected: str) -> InputError:
        return InputError(f"Setting {name} from {origin} must be {expected}, not {raw!r}.")

    if name in ("port", "max_attempts"):
        try:
            value = int(str(raw))
        except ValueError:
            raise bad("a whole number") from None
        return value
    if name in (
        "webhook_tolerance_s",
        "retry_backoff_s",
        "retry_backoff_max_s",
        "quick_timeout_s",
        "full_timeout_s",
        "reconcile_interval_s",
        "worker_poll_s",
    ):
        try:
            return float(str(raw))
        except ValueError:
            raise bad("a number of seconds") from None
    if name == "keep_outputs":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise bad("true or false")
    if name in ("data_dir", "policy_file", "webhook_secret_file"):
        return Path(str(raw)).expanduser()
    if name == "devices":
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        out = [str(d).strip() for d in items if str(d).strip()]
        if not out:
            raise bad("a comma-separated list of devices (auto, cpu, cuda:0...)")
        return out
    if name == "policy":
        if not isinstance(raw, dict):
            raise bad("a mapping (the policy)")
        return raw
    return str(raw)


def _validate(s: Settings) -> None:
    if not 0 < s.port < 65536:
        raise InputError(f"Port {s.port} is out of range; give SAE_MLOPS_PORT between 1 and 65535.")
    if s.max_attempts < 1:
        raise InputError(f"max_attempts is {s.max_attempts}; it must be at least 1.")
    for name in ("webhook_tolerance_s", "quick_timeout_s", "full_timeout_s", "worker_poll_s"):
        if getattr(s, name) <= 0:
            raise InputError(f"{name} is {getattr(s, name)}; it must be a positive number of seconds.")
    for name in ("retry_backoff_s", "retry_backoff_max_s", "reconcile_interval_s"):
        if getattr(s, name) < 0:
            raise InputError(f"{name} is {getattr(s, name)}; it must not be negative.")
    s.log_format = s.log_format.lower()
    if s.log_format not in LOG_FORMATS:
        raise InputError(f"log_format is {s.log_format!r}; use text or json.")
    s.log_level = s.log_level.upper()
    if s.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise InputError(f"log_level is {s.log_level!r}; use DEBUG, INFO, WARNING or ERROR.")
    if s.policy_file is not None and s.policy is not None:
        raise InputError("Both policy_file and an inline policy are set; keep one of them.")
