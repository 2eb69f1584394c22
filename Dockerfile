# The worker image (also runs the producer CLI). CUDA build of torch from the base image; the
# worker extra keeps it because it asks for torch as a range.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

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
