# fedfleet: one image for both roles; the command picks it.
#   docker build -t fedfleet .                                   # numpy tasks (songs, null)
#   docker build -t fedfleet:torch --build-arg EXTRAS=torch \
#     --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .   # + songs-mlp, mnist (CPU torch)
#   docker run fedfleet coordinator --host 0.0.0.0 --data-dir /data ...
#   docker run fedfleet worker --coordinator http://HOST:8080
# deploy/compose.yaml runs both; docs/deploy.md explains every way to deploy.

ARG PYTHON_IMAGE=python:3.11-slim

# --- stage 1: build the wheel and install it with its dependencies into a venv -------------------
FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
# Optional extra package index for the build (e.g. the CPU-only PyTorch wheels); unset by default.
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the wheel needs (see .dockerignore; the wheel carries the CloudFormation template): a change to tests or docs does not rebuild it.
COPY pyproject.toml README.md ./
COPY data/spotify-hits ./data/spotify-hits
COPY deploy/aws/fedfleet.yaml ./deploy/aws/fedfleet.yaml
COPY src ./src
# The wheel is built in an isolated environment (hatchling comes from the index, not from this image),
# then installed with its pinned-by-pyproject dependencies into a venv that the final stage copies.
RUN python -m venv /opt/fedfleet \
 && /opt/fedfleet/bin/pip wheel --no-deps --wheel-dir /dist . \
 && wheel="$(ls /dist/fedfleet-*.whl)" \
 && /opt/fedfleet/bin/pip install "${wheel}${EXTRAS:+[${EXTRAS}]}" \
 && /opt/fedfleet/bin/fedfleet --help > /dev/null

# --- stage 2: the runtime: the venv, a non-root user, nothing to build with ----------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fedfleet" \
      org.opencontainers.image.description="Federated learning: a coordinator and workers over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid so that volume ownership and Kubernetes' runAsUser agree.
RUN groupadd --system --gid 10001 fedfleet \
 && useradd --system --uid 10001 --gid fedfleet --home-dir /home/fedfleet --create-home \
            --shell /usr/sbin/nologin fedfleet \
 && mkdir -p /data /home/fedfleet/state \
 && chown fedfleet:fedfleet /data /home/fedfleet/state
COPY --from=build /opt/fedfleet /opt/fedfleet
# FEDFLEET_HEALTH_URL: what the HEALTHCHECK asks. The coordinator's /v1/health (public, no token)
# by default; a worker started with --metrics-port 9100 sets it to http://127.0.0.1:9100/metrics.
ENV PATH=/opt/fedfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEDFLEET_HEALTH_URL=http://127.0.0.1:8080/v1/health
USER 10001:10001
WORKDIR /home/fedfleet
EXPOSE 8080 9100
# Python, not curl: the slim image has no curl and needs none. Any answer other than 2xx fails.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['FEDFLEET_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["fedfleet"]
CMD ["--help"]
