# syntax=docker/dockerfile:1
#
# lossd images. Two targets from one file:
#   docker build -t lossd:0.1.0-cuda .                # default (last stage): CUDA runtime
#   docker build -t lossd:0.1.0-cpu --target cpu .    # slim CPU-only image
# Both install the project from its own pyproject.toml (`pip install
# "<src>[server,report]"`); nothing is installed by hand. The server runs as UID/GID 10001,
# needs no writable path other than /tmp (a volume here, an emptyDir in k8s/), and is
# configured through LOSSD_* variables (see `lossd serve --help`). See docs/deploy.md.

# Base images are written out in the FROM lines (not build args) so that scanners and
# update bots see the exact tags: python:3.11-slim-bookworm for the CPU image, the official
# PyTorch CUDA runtime image for the CUDA one (its torch satisfies the project's
# "torch>=2.4"; pip keeps it rather than fetching another build).

# ---------------------------------------------------------------------------------------
# source: exactly the files the package is built from (pyproject's package-dir layout).
# Used only as a build-time mount below, so the sources never become an image layer.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY protos/ /src/protos/
COPY client/ /src/client/
COPY server/ /src/server/

# ---------------------------------------------------------------------------------------
# cpu-build: a virtualenv at /opt/lossd with the CPU build of torch (from the PyTorch CPU
# index, so no CUDA wheels are pulled) and then lossd[server] from its pyproject.
FROM python:3.11-slim-bookworm AS cpu-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/lossd
ENV PATH=/opt/lossd/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# rw: setuptools writes build/ and *.egg-info next to the sources; those writes are
# discarded with the mount. The report extra (matplotlib) draws `lossd eval --report` and
# `lossd merge --report`, which the merge Job of k8s/jobs/sharded-eval/ runs.
RUN --mount=type=bind,from=source,source=/src,target=/src,rw \
    pip install --no-cache-dir "/src[server,report]" \
    && lossd serve --help >/dev/null
# The native gRPC front (LOSSD_FRONT=auto picks it) and the client's native transport (for
# `lossd eval` and clients run from the image): built here against Debian's gRPC C++, into
# /opt/lossd-native, which the runtime image loads (it installs the shared libraries).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 pkg-config=1.8.1-1 \
       libgrpc++-dev=1.51.1-3+b1 \
    && rm -rf /var/lib/apt/lists/* \
    && LOSSD_NATIVE_CACHE=/opt/lossd-native python -m lossd_server.native \
    && LOSSD_NATIVE_CACHE=/opt/lossd-native python -m lossd.native

# ---------------------------------------------------------------------------------------
# cpu: slim runtime with only the virtualenv from cpu-build.
FROM python:3.11-slim-bookworm AS cpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="lossd" \
      org.opencontainers.image.description="Per-sample ML losses as a gRPC service (CPU build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim-bookworm"
RUN groupadd --system --gid 10001 lossd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /tmp --shell /usr/sbin/nologin lossd \
    && apt-get update \
    && apt-get install -y --no-install-recommends libgrpc++1.51=1.51.1-3+b1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-build /opt/lossd /opt/lossd
COPY --from=cpu-build /opt/lossd-native /opt/lossd-native
# Settings: every LOSSD_* variable maps to a `lossd serve` flag. Bind all interfaces in a
# container. HOME and the cache variables point at /tmp, the only writable path.
# LOSSD_PROCESSES=auto: one serving process per core the container may use (its CPU quota,
# `docker run --cpus N`); Kubernetes sets it to the pod's CPU request (k8s/).
ENV PATH=/opt/lossd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOSSD_HOST=0.0.0.0 \
    LOSSD_PORT=50051 \
    LOSSD_METRICS_PORT=9464 \
    LOSSD_DEVICE=cpu \
    LOSSD_PROCESSES=auto \
    LOSSD_LOG_FORMAT=json \
    LOSSD_NATIVE_CACHE=/opt/lossd-native \
    TMPDIR=/tmp \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton
COPY docker/healthcheck.py /usr/local/lib/lossd/healthcheck.py
# One shard of a sharded evaluation: what the Indexed Job of k8s/jobs/sharded-eval/ runs.
COPY examples/sharded_eval.py /usr/local/lib/lossd/examples/sharded_eval.py
# Plugins (docs/plugins.md, "Ship it"): an image FROM this one installs one with a plain
# `pip install` as the lossd user. PIP_PREFIX sends it to /opt/lossd-plugins (owned by that
# user; pip leaves torch and lossd where they are), which Python finds, entry points and
# all, through a .pth file. Run with a read-only root, as k8s/ does, and nothing changes it.
COPY docker/plugin_site.py /usr/local/lib/lossd/plugin_site.py
RUN install -d -o 10001 -g 10001 /opt/lossd-plugins \
    && python /usr/local/lib/lossd/plugin_site.py /opt/lossd-plugins
ENV PIP_PREFIX=/opt/lossd-plugins
# With `docker run --read-only` /tmp stays writable through this anonymous volume.
VOLUME ["/tmp"]
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 9464
# Docker/Compose only: Kubernetes ignores HEALTHCHECK and uses the native gRPC probes in
# k8s/. A real check (grpc.health.v1 Check on LOSSD_PORT), not a port poke.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/lossd/healthcheck.py"]
# Exec form: lossd is PID 1 and gets SIGTERM itself; it turns health NOT_SERVING, drains
# in-flight calls for LOSSD_GRACE_SECONDS, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lossd", "serve"]

# ---------------------------------------------------------------------------------------
# cuda (default target): the official PyTorch CUDA runtime image plus lossd[server]. It
# serves with the grpcio front (LOSSD_FRONT=auto says so at start): its Ubuntu 22.04 base
# ships gRPC C++ 1.30, older than the 1.51 the native front is built against (docs/deploy.md).
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime AS cuda
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="lossd" \
      org.opencontainers.image.description="Per-sample ML losses as a gRPC service (CUDA build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# The base's torch (a CUDA build) satisfies torch>=2.4, so pip only adds what is missing.
RUN --mount=type=bind,from=source,source=/src,target=/src,rw \
    pip install --no-cache-dir "/src[server,report]" \
    && lossd serve --help >/dev/null
RUN groupadd --system --gid 10001 lossd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /tmp --shell /usr/sbin/nologin lossd
# LOSSD_PROCESSES=auto: 4 serving processes per visible GPU (each with a CUDA context).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOSSD_HOST=0.0.0.0 \
    LOSSD_PORT=50051 \
    LOSSD_METRICS_PORT=9464 \
    LOSSD_DEVICE=auto \
    LOSSD_PROCESSES=auto \
    LOSSD_LOG_FORMAT=json \
    TMPDIR=/tmp \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache
COPY docker/healthcheck.py /usr/local/lib/lossd/healthcheck.py
COPY examples/sharded_eval.py /usr/local/lib/lossd/examples/sharded_eval.py
COPY docker/plugin_site.py /usr/local/lib/lossd/plugin_site.py
RUN install -d -o 10001 -g 10001 /opt/lossd-plugins \
    && python /usr/local/lib/lossd/plugin_site.py /opt/lossd-plugins
ENV PIP_PREFIX=/opt/lossd-plugins
VOLUME ["/tmp"]
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/lib/lossd/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lossd", "serve"]
