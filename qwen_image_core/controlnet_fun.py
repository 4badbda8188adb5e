"""The VideoX-Fun ControlNet Union for Qwen-Image-2512 (alibaba-pai/Qwen-Image-2512-Fun-Controlnet-Union, files
`Qwen-Image-2512-Fun-Controlnet-Union[-2602].safetensors`): a VACE-style control branch of 5 DiT blocks whose
hints are added to the DiT's image stream after blocks 0, 12, 24, 36 and 48.

Facts, and where they were read (no code taken from them):
* Keys and shapes: `control_img_in` Linear(132 -> 3072); `control_blocks.0..4`, each a Qwen-Image double-stream
  block under the DiT's key names plus `after_proj` Linear(3072 -> 3072), block 0 also `before_proj`; 174 tensors
  (aigc-apps/VideoX-Fun videox_fun/models/qwenimage_transformer2d_control.py, QwenImageControlTransformerBlock;
  comfyanonymous/ComfyUI comfy/ldm/qwen_image/controlnet.py, QwenImageFunControlNetModel, PR #12359, v0.14.0).
* The branch uses the DiT's own input layers: h = DiT.img_in(patchified noisy latent), the text through
  DiT.txt_norm / txt_in, the DiT's timestep embedding and RoPE table (same files; newer ComfyUI passes the
  base model to the ControlNet for this, comfy/controlnet.py `load_controlnet_qwen_fun` / QwenFunControlNet).
* Forward: c = control_img_in(patchified context); block 0 runs on before_proj(c) + h, block k > 0 on block
  k - 1's image stream; the text stream passes from control block to control block (starting from the embedded
  prompt, independent of the DiT's); hint k = after_proj(image stream after block k) (VideoX-Fun forward_vace).
* Injection: hint k * control_context_scale is added to the DiT image stream after DiT block control_layers[k],
  control_layers = [0, 12, 24, 36, 48] for the 2512 file (ComfyUI's injection_layers; VideoX-Fun
  BaseQwenImageTransformerBlock). ComfyUI multiplies by the ControlNet strength (the same scale); the model card
  recommends 0.70 - 0.95 ("control_context_scale").
* Control context, 33 channels before 2 x 2 patching (132 features): [control latent 16 | 1 - mask 1 | inpaint
  latent 16]. The control latent is the VAE posterior mean of the control image in [-1, 1], normalised with the
  VAE's latent mean / std; the mask (1 = repaint) is binarised at 0.5, inverted and resized nearest to the latent
  size; the inpaint latent is the normalised posterior mean of the image with the repaint pixels set to 0 (mid
  grey in [-1, 1]). Without a mask the mask channel is 0, without an inpaint image its latent is 0 (VideoX-Fun
  videox_fun/pipeline/pipeline_qwenimage_control.py; ComfyUI's stock apply nodes give a control latent only and
  fill both with zeros). VideoX-Fun's predict script passes a black image instead of none, whose inpaint latent
  is not 0: `context_latent(..., inpaint=None)` follows the pipeline and ComfyUI.
* CFG: the control context is repeated for the negative rows and each row's branch runs with its own prompt
  (VideoX-Fun's pipeline; ComfyUI runs the ControlNet on each conditioning's own text); the text attention mask
  is that of the DiT here (ComfyUI drops it in the control blocks: the same unless prompts are zero-padded).
Parity: ComfyUI 0.3.75 has no Fun ControlNet and the newer code cannot run here; tests/test_controlnet_fun.py
compares against an oracle written from these facts on ComfyUI 0.3.75's own Qwen-Image block and input layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .checkpoint import CheckpointError
from .controlnet import branch_inputs
from .formats import controlnet_fun as fun_format
from .formats.common import assign_weights
from .mmdit import DoubleStreamBlock, MMDiT, MMDiTConfig, patchify
from .ops import Linear


@dataclass(frozen=True)
class FunConfig:
    """Sizes of the Fun control branch; the defaults are the published 2512 file's."""

    num_blocks: int = 5  # control blocks (one hint each)
    num_heads: int = 24  # attention heads; hidden = num_heads * head_dim = 3072, the DiT's width
    head_dim: int = 128  # channels per head
    mlp_dim: int = 12288  # MLP hidden size, 4 x 3072
    injection_layers: tuple[int, ...] = fun_format.INJECTION_LAYERS  # DiT block after which hint k is added
    context_channels: int = fun_format.CONTEXT_CHANNELS  # 33: control latent 16 | 1 - mask | inpaint latent 16
    patch_size: int = 2  # latent pixels per token side, as the DiT
    eps: float = 1e-6  # LayerNorm / RMSNorm epsilon, as the DiT

    def __post_init__(self):
        if len(self.injection_layers) != self.num_blocks or len(set(self.injection_layers)) != self.num_blocks:
            raise ValueError(f"injection_layers {self.injection_layers}: need {self.num_blocks} distinct blocks")

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    def block_config(self) -> MMDiTConfig:
        """The DiT block sizes of a control block (its RoPE comes from the DiT: the axes here are unused)."""
        return MMDiTConfig(
            num_layers=self.num_blocks, num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
            rope_axes=(0, 0, self.head_dim), eps=self.eps,
        )  # fmt: skip


class FunControlBlock(DoubleStreamBlock):
    """A DiT block with the branch's zero-initialised projections: before_proj (block 0 only), after_proj.

    Both run inside the block's forward, so a block streamed by the offload executor (whose hooks wrap the forward)
    has all its weights on the device while any of them computes."""

    def __init__(self, cfg: FunConfig, first: bool):
        super().__init__(cfg.block_config())
        if first:
            self.before_proj = Linear(cfg.hidden, cfg.hidden)
        self.after_proj = Linear(cfg.hidden, cfg.hidden)

    def forward(self, c, txt, temb, pe, key_mask, attend=attention, h=None):
        """(image stream, text stream, hint) after this block; block 0 starts from before_proj(c) + h (the DiT's
        embedded latent h). Streams stay in their dtype; the projections compute in temb's (the compute) dtype."""
        if h is not None:
            c = self.before_proj(c).to(h.dtype) + h
        c, txt = super().forward(c, txt, temb, pe, key_mask, None, attend)
        return c, txt, self.after_proj(c.to(temb.dtype)).to(c.dtype)


class FunControlNet(nn.Module):
    """`net(dit, img, sigma, txt, context)` -> hints {DiT block index: [B, N, hidden]} (unscaled)."""

    kind = "fun"

    def __init__(self, config: FunConfig):
        super().__init__()
        cfg = self.config = config
        self.storage, self.path = "", None  # set by load_fun_controlnet
        self.control_img_in = Linear(cfg.context_channels * cfg.patch_size**2, cfg.hidden)
        self.control_blocks = nn.ModuleList(FunControlBlock(cfg, i == 0) for i in range(cfg.num_blocks))

    def check_dit(self, dit: MMDiT) -> None:
        """A clear error when `dit` is not a Qwen-Image DiT this branch belongs to (width, heads, blocks)."""
        c, d = self.config, dit.config
        if (d.hidden, d.head_dim, d.patch_size) != (c.hidden, c.head_dim, c.patch_size):
            raise ValueError(
                f"the Fun ControlNet is {c.num_heads} x {c.head_dim} wide, the diffusion model {d.num_heads} x "
                f"{d.head_dim}: it belongs to a Qwen-Image(-2512) DiT of its own width"
            )
        if max(c.injection_layers) >= d.num_layers:
            raise ValueError(
                f"the Fun ControlNet adds hints after DiT blocks {c.injection_layers}; this diffusion model has "
                f"{d.num_layers} blocks"
            )

    def forward(
        self,
        dit: MMDiT,
        img: torch.Tensor,
        timestep: torch.Tensor,
        txt: torch.Tensor,
        context: torch.Tensor,
        txt_mask: torch.Tensor | None = None,
        positions: str = "official",
        attention_fn: Callable | None = None,
        txt_lengths: Sequence[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Hints in the DiT's residual-stream dtype, keyed by the DiT block they follow.

        img [B, 16, H, W] normalised noisy latent; timestep [B] sigma; txt [B, L, text_dim] (+ txt_mask or
        txt_lengths as in `MMDiT.forward`); context [B|1, 33 (or 16: a control latent alone), H, W]
        (`context_latent`)."""
        self.check_dit(dit)
        cfg, dt, p = dit.config, img.dtype, self.config.patch_size
        b = img.shape[0]
        context = full_context(context)
        if context.shape[-2:] != img.shape[-2:] or b % context.shape[0]:
            raise ValueError(
                f"the control context is {tuple(context.shape)}; the latent {tuple(img.shape)} needs its size and a "
                "batch dividing its own"
            )
        context = context.repeat(b // context.shape[0], 1, 1, 1)  # CFG: the negative rows get the same context
        stream_dt = torch.float32 if dt == torch.float16 else dt
        x, grid = patchify(img, p)  # [B, N, 64]
        h = dit.img_in(x.to(dt)).to(stream_dt)  # the DiT's own embedding of the noisy latent
        temb, attend, key_mask, pe = branch_inputs(
            dit.time_text_embed, cfg, img, timestep, txt, grid, txt_lengths, txt_mask, positions, attention_fn
        )
        t = dit.txt_in(dit.txt_norm(txt.to(dt))).to(stream_dt)  # [B, L, D]

        c_tokens, _ = patchify(context.to(dt), p)  # [B, N, 132]
        c = self.control_img_in(c_tokens)
        hints = {}
        for k, (block, layer) in enumerate(zip(self.control_blocks, self.config.injection_layers, strict=True)):
            c, t, hints[layer] = block(c, t, temb, pe, key_mask, attend, h if k == 0 else None)
        return hints


def full_context(context: torch.Tensor) -> torch.Tensor:
    """A control context of 33 channels: a 16-channel control latent gets the zero mask and inpaint channels."""
    n = context.shape[1]
    if n == fun_format.CONTEXT_CHANNELS:
        return context
    if n == fun_format.CONTEXT_LAYOUT[0][1]:
        rest = fun_format.CONTEXT_CHANNELS - n
        return torch.cat([context, context.new_zeros(context.shape[0], rest, *context.shape[2:])], dim=1)
    raise ValueError(
        f"the Fun ControlNet takes a control context of {fun_format.CONTEXT_CHANNELS} channels "
        f"({' | '.join(f'{c} {what}' for what, c in fun_format.CONTEXT_LAYOUT)}) or a 16-channel control latent, "
        f"got {n}"
    )


def context_latent(control: torch.Tensor | None, mask: torch.Tensor | None = None, inpaint=None) -> torch.Tensor:
    """[B, 33, h, w] from normalised latents: control [B, 16, h, w] (None: zeros), mask [B, 1, H, W] at pixel
    or latent size (1 = repaint; None: nothing repainted, the channel is 0), inpaint [B, 16, h, w] the latent
    of the image with the repaint pixels set to 0 in [-1, 1] (None: zeros)."""
    ref = next((t for t in (control, inpaint) if t is not None), None)
    if ref is None:
        raise ValueError("context_latent: give a control latent, an inpaint latent or both")
    zeros = ref.new_zeros(ref.shape[0], fun_format.CONTEXT_LAYOUT[0][1], *ref.shape[2:])
    if mask is None:
        keep = ref.new_zeros(ref.shape[0], 1, *ref.shape[2:])
    else:
        m = (torch.as_tensor(mask, dtype=torch.float32) >= 0.5).float()
        keep = 1 - F.interpolate(m, size=tuple(ref.shape[-2:]), mode="nearest").to(ref)
    return torch.cat([zeros if control is None else control, keep, zeros if inpaint is None else inpaint], dim=1)


def load_fun_controlnet(path: str | os.PathLike, *, mmap: bool = False, **sizes) -> FunControlNet:
    """Load a Fun Qwen-Image ControlNet Union single file (bf16, fp16, fp32, float8 kept float8).

    `sizes`: FunConfig fields overriding the file's (e.g. injection_layers). A file of another family (InstantX,
    Flux, SDXL, a DiffSynth patch, a DiT) is a CheckpointError naming it."""
    unknown = sorted(set(sizes) - set(FunConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load_fun_controlnet: unknown size {', '.join(unknown)}; expected FunConfig fields")
    w = fun_format.read_fun_controlnet(path, mmap=mmap, overrides={k: v for k, v in sizes.items() if v is not None})
    try:
        cfg = FunConfig(**w.config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{w.path}: inconsistent Fun Qwen-Image ControlNet sizes ({e})") from None
    with torch.device("meta"):
        net = FunControlNet(cfg)
    assign_weights(net, w.tensors, w.scales, w.path, "Fun Qwen-Image ControlNet", w.packed)
    net.storage, net.path = w.storage, w.path
    return net.requires_grad_(False).eval()
