"""The names of the files an adapter is read from, torch-free so the worker's fetcher from object
storage (`worker.adapter_cache`) copies exactly what the engine would read."""

from __future__ import annotations

CONFIG_FILE = "adapter_config.json"
# PEFT's name first, then the name diffusers' save_lora_weights uses. A directory with neither may
# hold one other .safetensors file (a kohya or a renamed diffusers file), which is then the weights.
WEIGHT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
WEIGHT_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
