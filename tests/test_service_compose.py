"""docker-compose.yml, .env.example and the Dockerfiles agree (parsed here; no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "sae-mlops", "ray-head", "ray-worker"}
RAY_SERVICES = {"ray-head", "ray-worker"}
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _strings(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _used_vars(raw: dict) -> set[str]:
    out = set()
    for s in _strings(raw):
        out.update(m.group(1) for m in _VAR.finditer(s.replace("$$", "")))
    return out


def _interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {_interpolate(k, env): _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if isinstance(node, str):
        parts = node.split("$$")
        return "$".join(_VAR.sub(lambda m: env.get(m.group(1)) or (m.group(3) if m.group(2) in (":-", "-") else ""), p) for p in parts)
    return node


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example line without '=': {line!r}"
        assert key not in out, f"{key} twice in .env.example"
        out[key] = value
    return out


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {str(k): str(v) for k, v in env.items()}


def _port_map(service: dict) -> dict[int, str]:
    """container port -> published spec."""
    out = {}
    for p in service.get("ports", []):
        spec = str(p)
        container = int(spec.rsplit(":", 1)[-1].split("/")[0])
        out[container] = spec
    return out


def _health_url(service: dict) -> str:
    test = " ".join(service["healthcheck"]["test"])
    m = re.search(r"https?://[^'\" )]+", test)
    assert m, f"no URL in healthcheck {test}"
    return m.group(0)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _env_file(ROOT / ".env.example")


@pytest.fixture(scope="module")
def compose(raw, env_example) -> dict:
    return _interpolate(raw, env_example)


def test_services_present(compose):
    assert set(compose["services"]) == SERVICES


def test_every_variable_is_in_env_example_and_every_example_is_used(raw, env_example):
    used = _used_vars(raw)
    missing = sorted(used - set(env_example))
    assert not missing, f"used in docker-compose.yml but not in .env.example: {missing}"
    unused = sorted(set(env_example) - used)
    assert not unused, f"in .env.example but not used by docker-compose.yml: {unused}"
    assert all(env_example[v] for v in used), "every variable has an example value"


def test_depends_on_existing_services_with_matching_conditions(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec.get("condition", "service_started")
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; {dep} has no healthcheck"
            elif cond == "service_completed_successfully":
                assert str(services[dep].get("restart", "no")) == "no", f"{dep} is a one-shot; it must not restart"
            else:
                pytest.fail(f"{name} -> {dep}: use a condition (service_healthy / service_completed_successfully)")
            if set(services[dep].get("profiles") or ()) - set(svc.get("profiles") or ()):
                assert spec.get("required") is False, f"{name} needs {dep}, which only runs in a profile: required: false"
    # The chain: storage ready -> MLflow healthy -> the service.
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["sae-mlops"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_long_running_services_have_health_checks_and_restart(compose):
    for name in SERVICES - {"minio-init"}:
        svc = compose["services"][name]
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert svc.get("restart") == "unless-stopped", name


def test_named_volumes_declared_and_used(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            source = str(v).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                used.add(source)
    assert used == declared, f"used {sorted(used)} vs declared {sorted(declared)}"
    assert {"postgres-data", "minio-data", "sae-mlops-data"} <= declared


def test_the_service_and_mlflow_talk_on_consistent_ports(compose):
    services = compose["services"]
    svc, mlf = services["sae-mlops"], services["mlflow"]
    svc_env, mlf_env = _environment(svc), _environment(mlf)

    # The webhook MLflow calls reaches the service's port, by its compose name.
    port = int(svc_env["SAE_MLOPS_PORT"])
    hook = urlparse(svc_env["SAE_MLOPS_WEBHOOK_URL"])
    assert hook.hostname == "sae-mlops" and hook.port == port and hook.path == "/webhooks/mlflow"
    assert svc_env["SAE_MLOPS_HOST"] == "0.0.0.0"
    assert port in _port_map(svc)
    assert urlparse(_health_url(svc)).port == port
    assert hook.scheme in [s.strip() for s in mlf_env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"].split(",")]
    assert mlf_env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"  # the compose network is private
    assert mlf_env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]

    # The service's MLflow URL is the MLflow server's port, and the server accepts that Host header.
    mlflow_port = int(mlf_env["MLFLOW_PORT"])
    tracking = urlparse(svc_env["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow" and tracking.port == mlflow_port
    assert mlflow_port in _port_map(mlf)
    assert urlparse(_health_url(mlf)).port == mlflow_port
    allowed = mlf_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert any(a in (f"mlflow:{mlflow_port}", "mlflow:*", "*") for a in allowed)


def test_mlflow_uses_postgres_and_minio(compose):
    services = compose["services"]
    mlf_env = _environment(services["mlflow"])
    pg_env = _environment(services["postgres"])
    db = urlparse(mlf_env["MLFLOW_BACKEND_STORE_URI"])
    assert db.scheme == "postgresql+psycopg2" and db.hostname == "postgres" and db.port == 5432
    assert db.username == pg_env["POSTGRES_USER"] and db.password == pg_env["POSTGRES_PASSWORD"]
    assert db.path.lstrip("/") == pg_env["POSTGRES_DB"]

    minio = services["minio"]
    address = minio["command"][minio["command"].index("--address") + 1]
    s3 = urlparse(mlf_env["MLFLOW_S3_ENDPOINT_URL"])
    assert s3.hostname == "minio" and s3.port == int(address.lstrip(":"))
    minio_env = _environment(minio)
    assert mlf_env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert mlf_env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    bucket = urlparse(mlf_env["MLFLOW_ARTIFACTS_DESTINATION"])
    assert bucket.scheme == "s3"
    init_env = _environment(services["minio-init"])
    assert init_env["MLFLOW_ARTIFACTS_BUCKET"] == bucket.hostname
    init_script = (ROOT / "deploy" / "minio-init.sh").read_text()
    assert f"http://minio:{s3.port}" in init_script and "mc mb --ignore-existing" in init_script


def test_builds_and_images(compose):
    services = compose["services"]
    mlf_build = services["mlflow"]["build"]
    assert (ROOT / mlf_build["context"] / mlf_build["dockerfile"]).is_file()
    mlflow_df = (ROOT / mlf_build["dockerfile"]).read_text()
    assert "psycopg2-binary" in mlflow_df and "boto3" in mlflow_df
    entry = (ROOT / "deploy" / "mlflow-entrypoint.sh").read_text()
    assert "--serve-artifacts" in entry and "--app-name basic-auth" in entry
    assert "--artifacts-destination" in entry and "--backend-store-uri" in entry

    svc_build = services["sae-mlops"]["build"]
    project_df = (ROOT / svc_build["context"] / svc_build["dockerfile"]).read_text()
    assert "requirements-lock.txt" in project_df and "download.pytorch.org/whl/cpu" in project_df
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", (ROOT / "requirements-lock.txt").read_text(), re.M))
    assert locked["torch"] == "2.13.0+cpu"
    # Client and server MLflow versions come from the same variable.
    assert mlf_build["args"]["MLFLOW_VERSION"] == svc_build["args"]["MLFLOW_VERSION"]
    import mlflow

    assert mlf_build["args"]["MLFLOW_VERSION"] == mlflow.__version__ == locked["mlflow"]


def test_the_mounted_policy_is_valid(compose, env_example):
    from sae_mlops.service.policy import load_policy

    svc_env = _environment(compose["services"]["sae-mlops"])
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in compose["services"]["sae-mlops"]["volumes"]}
    host_path = mounts[svc_env["SAE_MLOPS_POLICY_FILE"]]
    policy = load_policy(ROOT / host_path)
    assert policy.rules


def _flag(command: list[str], name: str) -> str:
    (value,) = [c.split("=", 1)[1] for c in command if c.startswith(f"--{name}=")]
    return value


def test_the_ray_profile_head_worker_and_the_service_pointed_at_the_head(compose, env_example):
    from sae_mlops.service.settings import load_settings

    services = compose["services"]
    head, worker, svc = services["ray-head"], services["ray-worker"], services["sae-mlops"]
    # Only with `--profile ray`; the default stack is unchanged.
    assert head["profiles"] == ["ray"] and worker["profiles"] == ["ray"]
    assert all(not services[n].get("profiles") for n in SERVICES - RAY_SERVICES)
    # The service's image: Ray and Python on the nodes match the service's (it is the Ray driver).
    for node in (head, worker):
        assert node["image"] == svc["image"] and node["build"] == svc["build"] and node["entrypoint"] == ["ray"]
        assert node["command"][0] == "start" and "--block" in node["command"]
        assert int(_flag(node["command"], "num-cpus")) >= 1
        assert node.get("shm_size") and node.get("init") is True
    assert "--head" in head["command"] and "--head" not in worker["command"]
    # The worker joins the head's cluster port; the service reaches the head's Ray Client port.
    gcs_port = int(_flag(head["command"], "port"))
    joined = urlparse("//" + _flag(worker["command"], "address"))
    assert joined.hostname == "ray-head" and joined.port == gcs_port
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    svc_env = _environment(svc)
    client = urlparse(svc_env["SAE_MLOPS_RAY_ADDRESS"])
    assert client.scheme == "ray" and client.hostname == "ray-head"
    assert client.port == int(_flag(head["command"], "ray-client-server-port")) != gcs_port
    assert f"{client.port}" in " ".join(head["healthcheck"]["test"])
    # One token on every node and the service.
    for env in (_environment(head), _environment(worker), svc_env):
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == env_example["RAY_AUTH_TOKEN"]
    # The service's settings parse, as local (the default stack) and as ray.
    keys = {k: v for k, v in svc_env.items() if k.startswith("SAE_MLOPS_")}
    keys["SAE_MLOPS_WEBHOOK_SECRET"] = "x"
    local = load_settings(environ={**keys, "SAE_MLOPS_POLICY_FILE": ""})
    assert local.executor == "local"
    ray = load_settings(environ={**keys, "SAE_MLOPS_POLICY_FILE": "", "SAE_MLOPS_EXECUTOR": "ray"})
    assert ray.executor == "ray" and ray.ray_address == "ray://ray-head:10001" and ray.ray_workers >= 1
