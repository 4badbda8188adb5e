"""Qwen-Image (MMDiT, VAE, Qwen2.5-VL condition encoder) in plain PyTorch, usable with or without ComfyUI."""

__version__ = "0.1.0"
