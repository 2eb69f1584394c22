# The worker image (also runs the producer CLI). CUDA build of torch from the base image; the
# worker extra keeps it because it asks for torch as a range.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

# torch.compile (--compile / OMNI_COMPILE) builds kernels at run time: Triton's launchers need a C
# compiler, inductor's CPU kernels a C++ one. The runtime image has neither.
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY omni_engine ./omni_engine
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker,api]"

# Not root: the worker only needs to read adapters and the model cache and write the cache.
RUN useradd --create-home omni && mkdir -p /models /adapters && chown omni /models
USER omni
ENV OMNI_CACHE_DIR=/models HF_HOME=/models/hf
CMD ["omni-batch", "worker"]
