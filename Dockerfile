# llada-cpt on an NGC PyTorch image, which brings CUDA, cuDNN, TransformerEngine and apex.
#   docker build -t llada-cpt .
#   docker run --gpus all --ipc=host --rm -v $PWD/runs:/workspace/llada-cpt/runs llada-cpt \
#       launch/torchrun.sh train -c configs/tiny_cpu.yaml
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 OMP_NUM_THREADS=1
WORKDIR /workspace/llada-cpt
COPY . .
# Keep the image's torch / TE / apex: install our package and its GPU-side extras only.
RUN python -m pip install --no-build-isolation -e ".[gpu,hf,rl,eval]"
CMD ["llada-cpt", "--help"]
