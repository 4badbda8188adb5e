"""The Qwen-Image-2.1 family (the second architecture): 7B single-stream DiT with block-causal attention
and a prefix K/V cache, its schedule, and (part B) the Qwen3-VL-8B condition encoder and the RGBA VAE.
Shared pieces (attention, ops, checkpoint reading, formats, offload, sampling) live in qwen_image_core."""

from .attention import PrefixCache, cache_bytes
from .dit import DiT21, DiT21Config, load_dit21
from .layout import build_layout

__all__ = ["DiT21", "DiT21Config", "PrefixCache", "build_layout", "cache_bytes", "load_dit21"]
