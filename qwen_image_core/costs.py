"""What a job costs a GPU, as numbers for the offload planner: the card (TFLOPS, host link), the DiT's workload
(image, references, text, CFG), and the FLOPs and activation bytes of a DiT block and a text-encoder layer.
Nothing here allocates or needs a GPU; `detect_card` only reads the device's properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GB = 1e9
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------------------
# Hardware and workload
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    """A GPU for the time model. `tflops`: dense fp16/bf16 tensor peak with fp32 accumulate (the compute
    path here: float8 weights are upcast per layer, GEMMs run in bf16); `h2d_gbps`: effective pinned
    host-to-device bandwidth in GB/s; `mfu`: the fraction of peak the model reaches."""

    name: str
    vram: int  # total bytes
    tflops: float
    h2d_gbps: float
    mfu: float = 0.5  # anchors_performance §2: measured 38-52 % end to end; §4.4 plans at 50 %


# TFLOPS = SMs x boost clock x 512 FLOP/clock/SM (Ada/Ampere GeForce, fp16 with fp32 accumulate); this
# reproduces the anchors' 4090 165.2 and 4060 30.2. Bandwidth: 25 GB/s pinned on a x16 Gen4 link, 12.5 on x8.
CARDS = {
    "8GB": Card("RTX 4060 8 GB", 8 * GiB, 30.2, 12.5),
    "12GB": Card("RTX 4070 12 GB", 12 * GiB, 58.3, 25.0),
    "16GB": Card("RTX 4080 16 GB", 16 * GiB, 97.5, 25.0),
    "24GB": Card("RTX 4090 24 GB", 24 * GiB, 165.2, 25.0),
}

FLOP_PER_CLOCK_PER_SM = {8.0: 2048, 9.0: 4096}  # A100, H100 (dense bf16); GeForce parts: 512


def card_from_properties(name: str, total_memory: int, sms: int, clock_khz: int, capability: float,
                         h2d_gbps: float = 25.0) -> Card:  # fmt: skip
    """A Card for a detected GPU: TFLOPS = SMs x clock x FLOP/clock/SM (512 on GeForce Turing to Blackwell,
    which reproduces the 3090's 71 and the 4090's 165.2); the link defaults to pinned x16 Gen4."""
    per_sm = FLOP_PER_CLOCK_PER_SM.get(capability, 512)
    return Card(f"{name} {total_memory / GiB:.0f} GB", total_memory, sms * clock_khz * 1e3 * per_sm / 1e12, h2d_gbps)


def detect_card(device: torch.device | str = "cuda", h2d_gbps: float = 25.0) -> Card:
    """The Card of a CUDA device from its properties (the time model only; the memory comes from the driver).
    Properties some builds lack (`clock_rate`) fall back to typical values."""
    p = torch.cuda.get_device_properties(device)
    clock_khz = getattr(p, "clock_rate", 0) or 2_000_000  # kHz; absent from some builds
    sms = getattr(p, "multi_processor_count", 0) or 80
    capability = getattr(p, "major", 8) + getattr(p, "minor", 0) / 10
    return card_from_properties(getattr(p, "name", "GPU"), p.total_memory, sms, clock_khz, capability, h2d_gbps)


@dataclass(frozen=True)
class DiTWorkload:
    """One denoising step: a batch of target images, optional edit references, CFG on or off."""

    width: int = 1328  # target pixels
    height: int = 1328
    batch: int = 1
    cfg: bool = True  # cond + uncond batched in one pass (each weight crosses the bus once per step)
    text_tokens: int = 256  # prompt tokens after the template is dropped
    references: tuple[tuple[int, int], ...] = ()  # (width, height) pixels of each edit reference
    compute_bytes: int = 2  # bytes per activation element (bf16 / fp16)
    fp16: bool = False  # float16 compute keeps the residual streams in float32

    @property
    def rows(self) -> int:
        return self.batch * (2 if self.cfg else 1)

    @property
    def image_tokens(self) -> int:
        sizes = ((self.width, self.height), *self.references)
        return sum(math.ceil(w / 16) * math.ceil(h / 16) for w, h in sizes)  # 8x VAE, 2x2 patches

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def describe(self) -> str:
        refs = f" +{len(self.references)} ref" if self.references else ""
        return f"{self.width}x{self.height}{refs} {'CFG' if self.cfg else 'cfg 1'}"


# ---------------------------------------------------------------------------------------------------------
# FLOPs and activation memory
# ---------------------------------------------------------------------------------------------------------


def dit_block_flops(wl: DiTWorkload, hidden: int = 3072, mlp: int = 12288) -> float:
    """FLOPs of one DoubleStreamBlock for one step (anchors_performance §4.2).

    Each token passes its own stream's q, k, v, out (4 D^2) and MLP (2 D F) weights: 2 (4 D^2 + 2 D F)
    per token; joint attention is 4 N^2 D (QK^T and AV); AdaLN modulation 2 x 2 x 6 D^2 per row (tiny).
    Everything scales with the rows (batch x 2 with CFG).
    """
    n, d = wl.tokens, hidden
    linear = 2 * (4 * d * d + 2 * d * mlp) * n
    attention = 4 * n * n * d
    mod = 2 * 2 * 6 * d * d
    return wl.rows * (linear + attention + mod)


def dit_activation_bytes(wl: DiTWorkload, hidden: int = 3072, mlp: int = 12288) -> int:
    """Peak activation bytes of one DiT block (inference, no autograd); an upper estimate.

    rows = batch x (2 with CFG), N = image + reference + text tokens, e = compute bytes, s = residual
    bytes (4 in fp16, else e), D = hidden, F = MLP width.
      streams   = 2 rows N D s          the block's input and output residual streams
      attention = 10 rows N D e         modulated inputs, q k v, RoPE's float32 temporaries, output
      mlp       = rows N D e + 2 rows N_img F e   modulated input, up-projection and its GELU
      cast      = 6 D F                 the largest weight dequantised to float32 and cast to bf16
      peak      = streams + max(attention, mlp) + cast
    SDPA is assumed to be a flash / memory-efficient kernel (no rows x heads x N^2 score matrix).
    """
    e, s = wl.compute_bytes, 4 if wl.fp16 else wl.compute_bytes
    nd = wl.rows * wl.tokens * hidden
    attention = 10 * nd * e
    mlp_phase = nd * e + 2 * wl.rows * wl.image_tokens * mlp * e
    return 2 * nd * s + max(attention, mlp_phase) + 6 * hidden * mlp


def sampling_bytes(wl: DiTWorkload, hidden: int = 3072, mlp: int = 12288) -> int:
    """Working memory of a sampling run besides the weights: one block's activations plus the float32
    latents the sampler keeps (x, noise, the step's temporaries: about 6 copies)."""
    latents = wl.batch * 16 * (wl.height // 8) * (wl.width // 8) * 4 * 6
    return dit_activation_bytes(wl, hidden, mlp) + latents


def text_encoder_layer_flops(tokens: int, batch: int = 1, hidden: int = 3584, inter: int = 18944,
                             heads: int = 28, kv_heads: int = 4, head_dim: int = 128) -> float:  # fmt: skip
    """FLOPs of one Qwen2.5-VL decoder layer: q/o (2 x D x Hq hd), k/v (2 x D x Hkv hd), SwiGLU (3 D I),
    causal attention (2 L^2 Hq hd)."""
    weights = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return batch * (2 * weights * tokens + 2 * tokens * tokens * heads * head_dim)


def text_encoder_activation_bytes(tokens: int, batch: int = 1, hidden: int = 3584, inter: int = 18944,
                                  compute_bytes: int = 2) -> int:  # fmt: skip
    """Peak activation bytes of one decoder layer: 8 B L D (residual, norm, q k v, RoPE temporaries,
    output) or B L (2 D + 3 I) in the MLP (gate, up, their product), whichever is larger, + a float32
    weight cast of the largest Linear."""
    bl = batch * tokens
    return max(8 * bl * hidden, bl * (2 * hidden + 3 * inter)) * compute_bytes + 6 * hidden * inter
