# KiloClaw operator image.
#   make image                      (podman or buildah; or: docker build -t kiloclaw-operator:dev .)
# Both stages use the same base so the virtualenv's interpreter link resolves in the final image. The base is
# pinned by digest (a tag can be re-pushed, a digest cannot); BASE is overridable for machines without a
# registry (the tests build on a local Debian bookworm + python3 base, tests/image/base.sh).
ARG BASE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

# Stage 1: build the wheel and install it with its dependencies into a virtualenv.
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/venv
# Metadata first: the package sources change more often than the build inputs.
COPY pyproject.toml README.md ./
COPY operator ./operator
# The official kubernetes client ships its generated API twice, synchronous and asyncio (kubernetes/aio, 68 MB);
# the operator uses only its configuration loading, and nothing imports kubernetes.aio: left out.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel \
 && rm -rf /opt/venv/lib/python3*/site-packages/kubernetes/aio

# Stage 2: the runtime — the virtualenv on a clean base; no compilers, no sources, no pip.
FROM ${BASE}
LABEL org.opencontainers.image.title="kiloclaw-operator" \
      org.opencontainers.image.description="Kubernetes operator running KiloClaw sandboxes as Fly.io Machines" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# USER: the runtime user has no /etc/passwd entry (and Kubernetes may pick any runAsUser), so
# getpass.getuser(), which kopf calls for its identity, must find the name in the environment.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    USER=kiloclaw-operator
# Numeric, so Kubernetes can verify runAsNonRoot without an /etc/passwd entry (65532 = "nonroot").
USER 65532:65532
# 8080: the operator's liveness/readiness endpoint (/healthz); 9090: Prometheus metrics (/metrics).
EXPOSE 8080 9090
# Configuration comes from the environment only (the Fly token from a Secret at run time).
ENTRYPOINT ["kiloclaw-operator", "run"]
