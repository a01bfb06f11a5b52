# syntax=docker/dockerfile:1
# The ATLAS operator image. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/atlas-specdec/atlas-operator:0.1.0 .
# Small on purpose: the operator needs kopf and the Kubernetes client, not torch, so the
# package is copied in rather than pip-installed with the project's (ML) dependencies.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

RUN pip install "kopf==1.45.2" "kubernetes==37.0.2" "pyyaml>=6" "jsonschema>=4.20"

COPY operator/atlas_operator /app/atlas_operator

# Unprivileged (the chart's podSecurityContext runs it as 65532 too).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["python", "-m", "atlas_operator.main"]
