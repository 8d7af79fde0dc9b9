# autoseg for GPU clusters: CUDA PyTorch base image, autoseg installed on top.
# Build:  docker build -t autoseg .
# Run:    docker run --gpus all --ipc=host -v /data:/data autoseg plan 4
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV AUTOSEG_RAW=/data/raw \
    AUTOSEG_PREPROCESSED=/data/preprocessed \
    AUTOSEG_RESULTS=/data/results \
    PYTHONUNBUFFERED=1

WORKDIR /opt/autoseg
COPY pyproject.toml README.md ./
COPY autoseg ./autoseg
# The base image's CUDA torch satisfies autoseg's torch>=2.1, so pip keeps it.
RUN pip install --no-cache-dir . && useradd --create-home autoseg
USER autoseg
WORKDIR /data
ENTRYPOINT ["autoseg"]
CMD ["--help"]
