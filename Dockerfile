# syntax=docker/dockerfile:1
#
# s3cache container image.
#
#   docker build -t s3cache .
#   docker run --rm -p 8080:8080 -v s3cache-data:/var/cache/s3cache \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_REGION s3cache
#
# Every setting can be given as a flag after the image name (replacing CMD), as an
# S3CACHE_* environment variable, or in a TOML file passed with --config.
# s3cache drains in-flight requests for up to 30 s after SIGTERM: give it the time
# (docker stop -t 40, compose stop_grace_period: 40s, k8s terminationGracePeriodSeconds).
# The HEALTHCHECK probes port 8080: keep it if --listen is changed.

# --- builder: the s3cache wheel and the wheels of its runtime dependencies -------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY s3cache ./s3cache
RUN pip wheel --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="s3cache" \
      org.opencontainers.image.description="S3 read-through caching proxy" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The wheels are bind-mounted from the builder, so they never become a layer of this
# image; only s3cache and its runtime dependencies are installed (no extras).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/s3cache-*.whl

# A fixed UID/GID, so that volume ownership and runAsUser stay stable across images.
RUN groupadd --system --gid 10001 s3cache \
    && useradd --system --uid 10001 --gid s3cache --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin s3cache \
    && mkdir -p /var/cache/s3cache \
    && chown s3cache:s3cache /var/cache/s3cache \
    && chmod 0750 /var/cache/s3cache

VOLUME ["/var/cache/s3cache"]
EXPOSE 8080

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/cache/s3cache

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/_s3cache/healthz', timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["s3cache"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--cache-dir", "/var/cache/s3cache"]
