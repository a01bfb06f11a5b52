# syntax=docker/dockerfile:1
# The ATLAS gRPC sidecar (`atlas serve`), the second container of every serving pod.
# Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/atlas-specdec/atlas-sidecar:0.1.0 .
# torch's default Linux wheel carries its CUDA libraries, so no CUDA base image is needed;
# a build stage keeps compilers and pip caches out of the runtime image.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md constraints.txt /src/
COPY sidecar /src/sidecar
COPY kernels /src/kernels
COPY operator /src/operator
# `s3`: boto3, for a weights store on S3 (learning/objectstore.py).
# The lock, less its CPU build of torch (the image takes torch's default CUDA wheel).
RUN grep -v '^torch==' /src/constraints.txt > /tmp/lock.txt \
    && pip install -c /tmp/lock.txt "torch==2.13.0" \
    && pip install -c /tmp/lock.txt "/src[serve,triton,s3]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH HOME=/tmp
COPY --from=build /opt/venv /opt/venv
# The operator runs the sidecar as uid 1000 with a read-only root filesystem (/tmp is a volume).
USER 1000:1000
EXPOSE 50051 9090
ENTRYPOINT ["atlas"]
CMD ["serve", "--host", "0.0.0.0"]
