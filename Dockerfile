# One image for any of the three services; SERVICE=policy|generator|classifier picks one.
#
#   docker build -t onnx-model-serving .                                   # CPU host
#   docker build -t onnx-model-serving:gpu \
#       --build-arg ONNXRUNTIME="onnxruntime-gpu[cuda,cudnn]==1.31.1" .     # GPU host (CUDA from pip)
#
# No torch: serving needs only the packages in pyproject.toml's [project].dependencies.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# onnxruntime (CPU only, ~24 MB) or onnxruntime-gpu[cuda,cudnn] (brings CUDA 13 and cuDNN 9;
# the host needs only the NVIDIA driver and container toolkit).
ARG ONNXRUNTIME=onnxruntime==1.31.1
# Air-gapped builds: put wheels in deploy/wheelhouse/ and pass PIP_INDEX_OPTIONS=--no-index.
ARG PIP_INDEX_OPTIONS=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp BENTOML_HOME=/tmp/bentoml BENTOML_DO_NOT_TRACK=True \
    MODELS_DIR=/app/models SERVICE=policy HOST=0.0.0.0 PORT=3000 \
    TEACH_STORE=sqlite:////data/taught.db TEACH_STATE_PATH=/data/taught.json \
    MODEL_CONTROL_DIR=/data/model-control

COPY pyproject.toml deploy/requirements.py /tmp/build/
COPY deploy/wheelhouse/ /tmp/wheelhouse/
RUN python3 -m venv /opt/venv \
 && python3 /tmp/build/requirements.py --onnxruntime "$ONNXRUNTIME" --pyproject /tmp/build/pyproject.toml \
        > /tmp/build/requirements.txt \
 && pip install --no-cache-dir --disable-pip-version-check $PIP_INDEX_OPTIONS --find-links /tmp/wheelhouse \
        -r /tmp/build/requirements.txt \
 && rm -rf /tmp/build /tmp/wheelhouse

# A non-root user without relying on useradd (minimal bases lack it). /data holds state
# that must outlive the container (the classifier's taught examples, the model versions
# chosen over the admin API): mount a volume there.
RUN echo "app:x:10001:10001:app:/tmp:/usr/sbin/nologin" >> /etc/passwd \
 && echo "app:x:10001:" >> /etc/group \
 && mkdir -p /data && chown 10001:10001 /data

WORKDIR /app
COPY services/ /app/services/
# Models are baked in; mount another repository read-only over /app/models to override them.
COPY models/ /app/models/
USER 10001:10001
EXPOSE 3000
VOLUME ["/data"]
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ['PORT'], timeout=2)"
CMD ["python3", "-m", "services", "--exec"]
