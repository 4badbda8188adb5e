"""The Qwen-Image-2.1 family (the second architecture): 7B single-stream DiT with block-causal attention
and a prefix K/V cache, its schedule, and (part B) the Qwen3-VL-8B condition encoder and the RGBA VAE.
Shared pieces (attention, ops, checkpoint reading, formats, offload, sampling) live in qwen_image_core."""

from .attention import PrefixCache, cache_bytes
from .dit import DiT21, DiT21Config, load_dit21
from .encoder import Qwen3VLEncoder, load_qwen3_vl
from .layout import build_layout
from .pipeline import QwenImage21Pipeline
from .plan import Workload21, plan_dit21
from .qwen3_vl import Qwen3VL, Qwen3VLConfig
from .vae import ImageVAE21, VAE21Config

__all__ = ["DiT21", "DiT21Config", "PrefixCache", "build_layout", "cache_bytes", "load_dit21"]
__all__ += ["ImageVAE21", "Qwen3VL", "Qwen3VLConfig", "Qwen3VLEncoder", "VAE21Config", "load_qwen3_vl"]
__all__ += ["Workload21", "plan_dit21"]
__all__ += ["QwenImage21Pipeline"]
