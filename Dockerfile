# syntax=docker/dockerfile:1
# Build: docker build -t gateway:0.1.0 .   Run: mount a config at /etc/gateway/gateway.yaml.

# Build stage: install the gateway and its runtime dependencies (no test or dev extras) into a venv,
# with the request path compiled to C by mypyc (GATEWAY_COMPILE=1, setup.py): a C compiler here
# only, none in the runtime image.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_COMPILE=1
# The compiler follows the base image's Debian release (versions pinned by the base image tag).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
# The venv gets no pip of its own (the base image's pip installs into it), and pip compiles the
# bytecode here, so the read-only root filesystem costs nothing at run time.
RUN python -m venv --without-pip /opt/gateway \
    && pip --python /opt/gateway/bin/python install --no-cache-dir .

# Runtime stage: the slim base, the venv (runtime dependencies only), an unprivileged user.
FROM python:3.11-slim
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway

# Runs as 10001 (deploy/k8s/deployment.yaml sets the same runAsUser), read-only root friendly.
USER 10001:10001
# 8080: listen.port (proxy); 9100: admin.port (/metrics, /healthz, /readyz).
EXPOSE 8080 9100
# Liveness on the admin listener; /healthz never depends on the identity provider.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/gateway/gateway.yaml"]
