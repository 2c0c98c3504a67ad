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
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_mlops.errors import InputError

ENV_PREFIX = "SAE_MLOPS_"
CONFIG_ENV = "SAE_MLOPS_CONFIG"
WEBHOOK_PATH = "/webhooks/mlflow"
LOG_FORMATS = ("text", "json")


class Settings(BaseModel):
    """Everything `sae-mlops serve` can be told (see each field's description: meaning, unit, default).

    A pydantic model: unknown keys are refused (``extra="forbid"``). `load_settings` builds it from
    the defaults, the config file, the environment and the command line, with one-sentence errors.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    tracking_uri: Optional[str] = Field(
        None, description="The MLflow tracking server. Env: MLFLOW_TRACKING_URI. Default: MLflow's default.")
    host: str = Field(
        "127.0.0.1", description="Interface the webhook receiver listens on. Default 127.0.0.1 (loopback); "
        "listen on another interface only with read_token set.")
    port: int = Field(8080, description="TCP port the webhook receiver listens on (1-65535). Default 8080.")
    data_dir: Path = Field(
        Path("sae-mlops-service"), description="Directory of the queue database, job specs, logs and outputs "
        "(queue.db, jobs/<id>/). Default ./sae-mlops-service.")
    webhook_secret: Optional[str] = Field(
        None, repr=False, description="HMAC secret shared with the MLflow webhook. Required (or webhook_secret_file).")
    webhook_secret_file: Optional[Path] = Field(
        None, description="File holding the webhook secret (e.g. a Docker secret), used when webhook_secret is unset.")
    webhook_tolerance_s: float = Field(
        300.0, description="Seconds: deliveries whose timestamp is further than this from now are refused; "
        "delivery ids are remembered at least twice this long (replays are refused). Default 300.")
    webhook_url: Optional[str] = Field(
        None, description="When set, the service creates (or updates) the MLflow webhook webhook_name pointing at "
        "this URL, with the secret and the events the policy listens to. Default: unset (no webhook managed).")
    webhook_name: str = Field("sae-mlops", description="Name of the MLflow webhook the service manages. Default sae-mlops.")
    policy_file: Optional[Path] = Field(
        None, description="Policy file (YAML/JSON). Default: the inline policy of the config file, else the default "
        "policy (a quick analysis of every new version).")
    policy: Optional[dict[str, Any]] = Field(None, description="The policy inline (config file only). Default: unset.")
    devices: list[str] = Field(
        default_factory=lambda: ["auto"], description="One worker per device (auto, cpu, cuda:0...), each running one "
        "job at a time; comma-separated in the environment. Default [auto].")
    max_attempts: int = Field(3, description="Attempts per job before it is marked failed (>= 1). Default 3.")
    retry_backoff_s: float = Field(
        30.0, description="Seconds before the second attempt; doubles per attempt up to retry_backoff_max_s. Default 30.")
    retry_backoff_max_s: float = Field(1800.0, description="Seconds: the longest wait between attempts. Default 1800.")
    quick_timeout_s: float = Field(3600.0, description="Seconds a quick analysis may run before it is killed (and retried). Default 3600.")
    full_timeout_s: float = Field(21600.0, description="Seconds a full analysis may run before it is killed (and retried). Default 21600.")
    reconcile_interval_s: float = Field(
        300.0, description="Seconds between registry scans for versions the webhooks missed (the first runs at "
        "start); 0: only at start. Default 300.")
    experiment: str = Field("sae-mlops-service", description="MLflow experiment of the analysis runs. Default sae-mlops-service.")
    keep_outputs: bool = Field(
        False, description="Keep each job's local output directory after its files are logged to MLflow. Default false.")
    log_format: str = Field("text", description="text (rich console) or json (one JSON object per line on stderr). Default text.")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR. Default INFO.")
    worker_poll_s: float = Field(2.0, description="Seconds an idle worker waits before looking at the queue again. Default 2.")
    read_token: Optional[str] = Field(
        None, repr=False, description="Bearer token for the read endpoints (GET /jobs, /jobs/<id>, /health details). "
        "Unset: they answer loopback clients only (others get 403, and /health only its status). Default unset.")
    tracking_outage_max_s: float = Field(
        3600.0, description="Seconds: a job waiting for an unreachable (or 5xx) tracking server is retried without "
        "using an attempt until the outage has lasted this long, then fails with that reason. Default 3600.")
    mlflow_http_timeout_s: float = Field(
        30.0, description="Seconds: MLflow HTTP request timeout for the service and its job processes "
        "(MLFLOW_HTTP_REQUEST_TIMEOUT, unless already set in the environment); an artifact upload waits this "
        "long for the server to store the file. Default 30.")
    mlflow_http_max_retries: int = Field(
        1, description="MLflow HTTP retries per request for the service and its job processes "
        "(MLFLOW_HTTP_REQUEST_MAX_RETRIES, unless already set in the environment). Default 1.")
    health_check_timeout_s: float = Field(
        2.0, description="Seconds: timeout of /health's probe of the tracking server (GET <uri>/health); the answer "
        "is cached for 5 s. Default 2.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where jobs run: local (each job in its own process on this machine, one worker per "
        "device) or ray (in-process on long-lived Ray actors that keep imports and base models loaded; see the ray_* "
        "settings; devices is then unused). Default local.")
    ray_address: Optional[str] = Field(
        None, description="executor ray: the Ray cluster to connect to (host:port of the head's GCS, ray://host:10001 "
        "for Ray Client, or auto). Unset: the service starts a local Ray instance and stops it on shutdown. "
        "Default unset.")
    ray_workers: int = Field(
        1, description="executor ray: number of long-lived actors, each running one job at a time (so up to this "
        "many SAE versions are analysed at once, spread over the cluster's nodes). Default 1.")
    ray_num_gpus: float = Field(
        0.0, description="executor ray: GPUs each actor requests from Ray (fractions share a GPU; > 0 places actors "
        "on GPU nodes and runs the analysis on cuda). Default 0 (CPU).")
    ray_cpus_per_worker: float = Field(
        1.0, description="executor ray: CPUs each actor requests from Ray (also its torch thread count, rounded "
        "down, at least 1). Default 1.")
    model_cache_size: int = Field(
        2, description="executor ray: base models each actor keeps loaded between jobs, least recently used "
        "evicted first, keyed by (model name, dtype, device, load kwargs); 0 loads the model for every job. "
        "Default 2.")
    ray_connect_timeout_s: float = Field(
        150.0, description="executor ray with a Ray Client address (ray://): seconds the connection to the cluster "
        "may take at start; after that the service exits with the reason, for its restart policy to start it again "
        "(the head's Ray Client proxy has failed to start a new client's server right after a kill -9 of the "
        "service, and the connection then hung). Default 150.")

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
        for name in Settings.model_fields:
            if name in ("webhook_secret", "policy", "read_token"):
                continue
            v = getattr(self, name)
            out[name] = str(v) if isinstance(v, Path) else v
        out["webhook_secret"] = "set" if (self.webhook_secret or self.webhook_secret_file) else "missing"
        out["read_token"] = "set" if self.read_token else "unset"
        return out


_FIELDS = dict(Settings.model_fields)
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
    try:
        settings = Settings(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err.get("loc", ())) or "?"
        origin = values.get(key, (None, "the settings"))[1]
        raise InputError(f"Setting {key} from {origin}: {err.get('msg', 'invalid')}.") from None
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

    if name in ("port", "max_attempts", "mlflow_http_max_retries", "ray_workers", "model_cache_size"):
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
        "tracking_outage_max_s",
        "mlflow_http_timeout_s",
        "health_check_timeout_s",
        "ray_num_gpus",
        "ray_cpus_per_worker",
        "ray_connect_timeout_s",
    ):
        try:
            return float(str(raw))
        except ValueError:
            raise bad("a number" if name.startswith("ray_") else "a number of seconds") from None
    if name == "executor":
        return str(raw).strip().lower()
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
    for name in ("webhook_tolerance_s", "quick_timeout_s", "full_timeout_s", "worker_poll_s", "tracking_outage_max_s",
                 "mlflow_http_timeout_s", "health_check_timeout_s"):
        if getattr(s, name) <= 0:
            raise InputError(f"{name} is {getattr(s, name)}; it must be a positive number of seconds.")
    if s.mlflow_http_max_retries < 0:
        raise InputError(f"mlflow_http_max_retries is {s.mlflow_http_max_retries}; it must not be negative.")
    for name in ("retry_backoff_s", "retry_backoff_max_s", "reconcile_interval_s"):
        if getattr(s, name) < 0:
            raise InputError(f"{name} is {getattr(s, name)}; it must not be negative.")
    s.log_format = s.log_format.lower()
    if s.log_format not in LOG_FORMATS:
        raise InputError(f"log_format is {s.log_format!r}; use text or json.")
    s.log_level = s.log_level.upper()
    if s.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise InputError(f"log_level is {s.log_level!r}; use DEBUG, INFO, WARNING or ERROR.")
    if s.ray_workers < 1:
        raise InputError(f"ray_workers is {s.ray_workers}; it must be at least 1.")
    if s.ray_num_gpus < 0:
        raise InputError(f"ray_num_gpus is {s.ray_num_gpus}; it must not be negative.")
    if s.ray_cpus_per_worker <= 0:
        raise InputError(f"ray_cpus_per_worker is {s.ray_cpus_per_worker}; it must be a positive number of CPUs.")
    if s.model_cache_size < 0:
        raise InputError(f"model_cache_size is {s.model_cache_size}; it must not be negative.")
    if s.ray_connect_timeout_s <= 0:
        raise InputError(f"ray_connect_timeout_s is {s.ray_connect_timeout_s}; it must be a positive number of seconds.")
    if s.policy_file is not None and s.policy is not None:
        raise InputError("Both policy_file and an inline policy are set; keep one of them.")
