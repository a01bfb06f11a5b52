# syntax=docker/dockerfile:1
# The ATLAS online trainer (`atlas trainer`), run by the operator as a Job per round: it
# ingests the traffic the sidecars mirror (gRPC: the `serve` extra), learns from it,
# publishes weight versions and reports them on its AtlasEndpoint's status (the
# Kubernetes client: the `operator` extra).
# Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/atlas-specdec/atlas-trainer:0.1.0 .
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md constraints.txt /src/
COPY sidecar /src/sidecar
COPY kernels /src/kernels
COPY operator /src/operator
# The lock, less its CPU build of torch (the image takes torch's default CUDA wheel).
RUN grep -v '^torch==' /src/constraints.txt > /tmp/lock.txt \
    && pip install -c /tmp/lock.txt "torch==2.13.0" \
    && pip install -c /tmp/lock.txt "/src[serve,operator]"
# boto3 for a weights store on S3, without its declared dependencies: botocore declares
# python-dateutil<3, kubernetes 37 needs >=3 (see pyproject.toml's `s3` extra).
RUN pip install --no-deps "boto3==1.44.18" "botocore==1.44.18" "s3transfer==0.19.3" \
    "jmespath==1.1.0"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH HOME=/tmp
COPY --from=build /opt/venv /opt/venv
USER 1000:1000
ENTRYPOINT ["atlas"]
# The operator's Job passes every flag (render.trainer_args); alone, the image says how.
CMD ["trainer", "--help"]
