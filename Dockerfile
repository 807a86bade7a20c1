# KiloClaw operator image.
#   docker build -t ghcr.io/kilo-org/kiloclaw-operator:0.1.0 .
# Both stages use the same pinned base so the virtualenv's interpreter link resolves in the final image.

# Stage 1: build the wheel and install it with its dependencies into a virtualenv.
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Metadata first: the package sources change more often than the build inputs.
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# Stage 2: the runtime — the virtualenv on a clean base; no compilers, no sources, no pip.
FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="kiloclaw-operator" \
      org.opencontainers.image.description="Kubernetes operator running KiloClaw sandboxes as Fly.io Machines" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
# Numeric, so Kubernetes can verify runAsNonRoot without an /etc/passwd entry (65532 = "nonroot").
USER 65532:65532
# 8080: kopf liveness endpoint (/healthz); 9090: Prometheus metrics (/metrics).
EXPOSE 8080 9090
# Configuration comes from the environment only (FLY_API_TOKEN from a Secret at run time).
ENTRYPOINT ["kiloclaw-operator", "run"]
