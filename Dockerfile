# autoseg on GPU machines: the official PyTorch CUDA runtime image with autoseg installed on top.
#
# Build from the repository root:
#   docker build -t autoseg:0.1.0 -t autoseg:latest .
# The base is pinned; for hosts whose NVIDIA driver is too old for CUDA 12.8, pick another tag of the
# official image, e.g. --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
#
# Data: the image reads and writes everything under /data, so mount one host folder there:
#   /data/raw           AUTOSEG_RAW           raw datasets (DatasetXXX_Name, nnU-Net layout)
#   /data/preprocessed  AUTOSEG_PREPROCESSED  plans and the training cache
#   /data/results       AUTOSEG_RESULTS       trained model folders
# (-v HOST:/data/raw etc. mounts them one by one.) Nothing is declared as VOLUME on purpose: a
# forgotten -v should fail loudly, not write the results into an anonymous volume that is easily lost.
#
# Run as yourself (--user) so that what autoseg writes on the host belongs to you, not to root or to
# the image's user. --ipc=host shares the host's /dev/shm: autoseg's data-loading worker processes
# and the process pools of plan/preprocess synchronise through semaphores there, and NCCL passes data
# between the GPUs of a multi-GPU run through it; Docker's default of 64 MB breaks multi-GPU runs
# (bus errors, NCCL errors). Where --ipc=host is not allowed, use --shm-size 16g instead.
#   DATA=/scratch/$USER/autoseg     # holds raw/Dataset004_Hippocampus/...
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" -v "$DATA":/data \
#       autoseg:0.1.0 plan 4 --gpu-memory-gb 24 -j 8
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" -v "$DATA":/data \
#       autoseg:0.1.0 preprocess 4 -c 3d_fullres -j 8
#   docker run --rm --gpus all --shm-size 16g --user "$(id -u):$(id -g)" -v "$DATA":/data \
#       autoseg:0.1.0 train 4 3d_fullres 0 --continue
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" -v "$DATA":/data \
#       -v "$PWD/scans":/in:ro -v "$PWD/segmentations":/out \
#       autoseg:0.1.0 predict -i /in -o /out -d 4 -c 3d_fullres -f 0 1 2 3 4
# One fold on four GPUs (DDP) goes through torchrun; each process sizes its loader from its share of
# the CPUs (CPUs / LOCAL_WORLD_SIZE), and -j sets it explicitly (here 32 CPUs / 4 GPUs - 1):
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" -v "$DATA":/data \
#       --entrypoint torchrun autoseg:0.1.0 --standalone --nproc_per_node 4 \
#       -m autoseg train 4 3d_fullres 0 --continue -j 7
# Data-loading workers follow the CPUs the container may use (--cpus, --cpuset-cpus); -j overrides.
# Apptainer/Singularity and SLURM: docs/cluster.md.

ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

LABEL org.opencontainers.image.title="autoseg" \
      org.opencontainers.image.description="Self-configuring U-Net segmentation for medical volumes (CUDA)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV AUTOSEG_RAW=/data/raw \
    AUTOSEG_PREPROCESSED=/data/preprocessed \
    AUTOSEG_RESULTS=/data/results \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/autoseg

# Dependencies first, in their own layer: editing autoseg's code does not reinstall them.
# The base image's CUDA torch already satisfies torch>=2.1; the constraints file pins it to exactly
# that build, so no dependency can make pip swap it for another torch from PyPI. It stays in the
# image (PIP_CONSTRAINT) for anyone who pip-installs more on top.
COPY pyproject.toml README.md ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /opt/autoseg/constraints.txt \
 && python -c "import sys; t = __import__('tomllib') if sys.version_info >= (3, 11) \
else __import__('pip._vendor.tomli', fromlist=['load']); \
print('\n'.join(t.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -c /opt/autoseg/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
ENV PIP_CONSTRAINT=/opt/autoseg/constraints.txt

COPY autoseg ./autoseg
RUN pip install --no-cache-dir --no-deps -c /opt/autoseg/constraints.txt . \
 && python -c "import torch; assert torch.version.cuda, 'the CUDA build of torch was replaced'" \
 && autoseg --version

# A non-root user for runs without --user; /data belongs to it (a mounted folder replaces it).
RUN useradd --create-home --shell /bin/bash autoseg \
 && mkdir -p /data/raw /data/preprocessed /data/results \
 && chown -R autoseg:autoseg /data
USER autoseg
WORKDIR /data

ENTRYPOINT ["autoseg"]
CMD ["--help"]
