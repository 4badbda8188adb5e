"""Qwen-Image-2.1's condition encoder as the pipeline and the nodes use it: prompts (+ references) -> features.

`load_qwen3_vl(path)` reads any supported Qwen3-VL file or folder (`formats/qwen3_vl.py`; llama.cpp GGUF with
its mmproj: `formats/qwen3_vl_gguf.py`) into a meta-built model filled by assignment (packed comfy_quant layers
and GGUF blocks stay packed) and finds the tokenizer.
`Qwen3VLEncoder.encode` builds the 2.1 chat text (`prompts.template_text`), runs the vision tower on the
references' VL copies and the language model on the tokens, and returns what diffusers'
`get_qwenimage21_prompt_embeds` returns: the last decoder layer's output (before the final norm) without the
system block, zero-padded, with a bool mask and a bool mask of the image-slot positions.

Each prompt is encoded on its own right-padded row: the model is causal and every row starts at position 0, so a
prompt's features do not depend on the other prompts of the batch (the reference pads on the left with an
attention mask, which gives the same numbers).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, open_checkpoint
from ..formats import gguf, qwen3_vl_gguf
from ..formats import qwen3_vl as fmt
from ..formats.common import assign_weights
from ..prompts import IMAGE_PAD, find_tokenizer, load_tokenizer, rope_index
from .prompts import SYSTEM_BLOCK, template_text, vision_patches21
from .qwen3_vl import Qwen3VL, Qwen3VLConfig
from .vision3 import Vision3Config


class Qwen3VLEncoder:
    """A loaded Qwen3-VL encoder with its tokenizer."""

    def __init__(self, model: Qwen3VL, tokenizer, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source  # the file or folder, for messages

    @property
    def has_vision(self) -> bool:
        return self.model.visual is not None

    def drop(self) -> int:
        """Leading tokens dropped from the features: the tokenized system block."""
        return len(self.tokenizer(SYSTEM_BLOCK)["input_ids"])

    def rows(self, prompts: Sequence[str], counts: Sequence[int]) -> list[list[int]]:
        """Token ids per prompt, each `<|image_pad|>` expanded to the number of its reference's merged tokens."""
        out = []
        for p in prompts:
            ids = self.tokenizer(template_text(p, len(counts)))["input_ids"]
            if ids.count(IMAGE_PAD) != len(counts):
                raise ValueError("the prompt holds <|image_pad|> tokens; references are placed by the template")
            expanded, k = [], 0
            for t in ids:
                expanded += [IMAGE_PAD] * counts[k] if t == IMAGE_PAD else [t]
                k += t == IMAGE_PAD
            out.append(expanded)
        return out

    @torch.inference_mode()
    def encode(
        self,
        prompts: str | Sequence[str],
        images=(),
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        check: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [B, T, hidden] in `dtype`, mask [B, T] bool, image-slot mask [B, T] bool).

        images: up to 10 references (PIL, uint8 arrays or [0, 1] tensors, RGB or RGBA), already resized as the
        caller wants (`prompts.official_resize` is the reference's); shared by every prompt. check: called
        between the layers of both towers; raise from it to stop (a host's interrupt check).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = list(images.unbind(0) if isinstance(images, torch.Tensor) and images.ndim == 4 else images)
        template_text("", len(images))  # refuses more than 10 references before any work
        if images and not self.has_vision:
            raise ValueError(
                getattr(self.model, "vision_note", None)
                or f"{self.source}: this Qwen3-VL file has no vision tower (no visual.* weights), so it can encode "
                "text-to-image prompts only; for editing load the full file (e.g. qwen3vl_8b_bf16.safetensors)"
            )
        device = torch.device(device) if device is not None else self.model.model.norm.weight.device
        feats, grids = None, []
        if images:
            pix = [vision_patches21(im) for im in images]
            grids = [g for _, g in pix]
            patches = torch.cat([p for p, _ in pix]).to(device=device, dtype=dtype)
            feats = self.model.encode_images(patches, grids, check)
        merge = self.model.cfg.vision.merge_size if images else 1
        rows = self.rows(prompts, [t * h * w // merge**2 for t, h, w in grids])
        drop, n = self.drop(), max(len(r) for r in rows)
        out = torch.zeros(len(rows), n - drop, self.model.cfg.hidden_size, dtype=dtype, device=device)
        mask = torch.zeros(len(rows), n - drop, dtype=torch.bool, device=device)
        slots = torch.zeros_like(mask)
        for i, row in enumerate(rows):  # one row per prompt (see the module docstring)
            ids = torch.tensor([row], device=device)
            image_mask = ids == IMAGE_PAD
            f = None if feats is None else (feats[0], feats[1])
            hidden = self.model(ids, rope_index(ids, grids), dtype, f, image_mask if f is not None else None, check)
            out[i, : len(row) - drop] = hidden[0, drop:]
            mask[i, : len(row) - drop] = True
            slots[i, : len(row) - drop] = image_mask[0, drop:]
        return out, mask, slots


def load_qwen3_vl(
    path: str | os.PathLike,
    tokenizer=None,
    *,
    mmap: bool = False,
    vision: dict | None = None,
    mmproj: str | os.PathLike | bool | None = None,
    **sizes,
) -> Qwen3VLEncoder:
    """Load a Qwen3-VL encoder from any supported file or folder.

    tokenizer: a loaded tokenizer, a folder to search (`prompts.find_tokenizer`), or None to search next to the
    weights (and a diffusers repo's `processor/` or `tokenizer/`; then an importable ComfyUI's Qwen tokenizer).
    Sizes come from `sizes` (Qwen3VLConfig fields) and `vision` (Vision3Config fields), then the folder's
    config.json or the file's `config` metadata, then the shapes (see `formats.qwen3_vl`). A llama.cpp GGUF
    (`*.gguf`, `formats.qwen3_vl_gguf`) takes its sizes from its metadata and its vision tower from an mmproj
    GGUF: `mmproj` None looks next to it, a path names it, False loads text only. Refuses other files, the v1
    Qwen2.5-VL encoder included, with a message saying what they are.
    """
    unknown = sorted(set(sizes) - set(Qwen3VLConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load_qwen3_vl: unknown size {', '.join(unknown)}; expected Qwen3VLConfig fields")
    path = Path(path)
    source = None  # a GGUF encoder's files (formats.qwen3_vl_gguf)
    if gguf.is_gguf(path):
        source = qwen3_vl_gguf.open_encoder(path, mmproj, mmap)
        where, shapes, known = path, source.shapes(), dict(source.known)
    elif mmproj is not None:
        raise TypeError(f"load_qwen3_vl: mmproj is for GGUF text encoders, not {path.name}")
    else:
        ckpt = open_checkpoint(path, mmap=mmap)
        names = fmt.encoder_names(ckpt)
        markers = fmt.encoder_markers(ckpt, names)
        where, known = ckpt.path, fmt.read_config(path, ckpt.metadata)
        shapes = fmt.encoder_shapes(ckpt, names, markers)
    known.update({k: v for k, v in sizes.items() if v is not None})
    known["vision"] = {**known.get("vision", {}), **(vision or {})}
    try:
        fields = fmt.config_fields(shapes, known, where)
        v = fields.pop("vision")
        cfg = Qwen3VLConfig(**fields, vision=Vision3Config(**v) if v is not None else None)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: inconsistent {fmt.WHAT} sizes ({e})") from None
    if source is not None:
        (weights, packed), scales, storage = source.weights(), {}, source.storage
    else:
        weights, scales, packed, storage = fmt.encoder_weights(ckpt, names, markers)
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    assign_weights(model, weights, scales, where, fmt.WHAT, packed)
    model.storage, model.path = storage, where
    model.vision_note = source.note if source is not None else None  # why an edit cannot run, where it cannot
    model.eval().requires_grad_(False)
    if tokenizer is None:  # beside the weights, or the diffusers repo's processor/ (Qwen/Qwen-Image-2.1's layout)
        root = path if path.is_dir() else path.parent
        tokenizer = load_tokenizer(find_tokenizer(None, search=[path, root.parent / "processor"]))
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(find_tokenizer(tokenizer))
    return Qwen3VLEncoder(model, tokenizer, source=str(path))
