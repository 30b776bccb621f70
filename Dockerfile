# One image for both services: the gateway (default command) and inventory_backend.
#
#   docker build -t rbac-gateway .                         # python:3.12-slim from a registry
#   docker build --build-arg BASE_IMAGE=local/python:3.11-bookworm -t rbac-gateway .
#
# Any Debian-like image with python3 (>= 3.11), venv and pip works as the base; see
# docs/DOCKER.md for the locally built stand-in used where no registry is reachable.
ARG BASE_IMAGE=python:3.12-slim

# --- build: resolve the pinned dependencies into a venv -----------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/venv
# Dependencies first, in their own layer, so editing the code does not re-download them.
COPY pyproject.toml constraints.txt ./
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt \
        $(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))')
COPY gateway/ gateway/
COPY inventory_backend/ inventory_backend/
# A regular (not editable) install: the runtime stage needs the venv only, not /src.
# The test and lint extras are deliberately left out.
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt . \
 && /opt/venv/bin/pip uninstall -y -q pip setuptools \
 && /opt/venv/bin/python -m compileall -q /opt/venv

# --- runtime -------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="rbac-gateway" \
      org.opencontainers.image.description="HTTP Basic + RBAC gateway and the demo inventory backend"

# A fixed numeric UID so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 -m 0750 /data \
 && install -d -m 0755 /etc/gateway /app

COPY --from=build /opt/venv /opt/venv
COPY scripts/healthcheck.py /app/healthcheck.py
# The shipped demo policy, so the image runs on its own; compose and Kubernetes mount their
# policy directory over /etc/gateway.
COPY rbac.yaml /etc/gateway/rbac.yaml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_POLICY=/etc/gateway/rbac.yaml \
    INVENTORY_HOST=0.0.0.0 \
    INVENTORY_PORT=8081 \
    INVENTORY_DB=/data/inventory.db

WORKDIR /app
USER 10001:10001
EXPOSE 8080 8081
# Works for both services: the probe passes when the gateway's or the backend's port answers.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
CMD ["python", "-m", "gateway", "serve"]
