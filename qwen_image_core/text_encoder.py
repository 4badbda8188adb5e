"""The condition encoder the pipeline and the nodes use: prompts (+ edit images) -> embeddings and mask.

`load_text_encoder(path)` reads any supported Qwen2.5-VL file or folder (see `formats/qwen_vl.py`) into a
meta-built model filled by assignment, and finds the tokenizer. `TextEncoder.encode` wraps the prompts
in the chosen template, runs the vision tower on the images and the language model on the tokens, and
returns the final-normed last hidden state without the template prefix, zero-padded, with a bool mask —
the same numbers as diffusers' `encode_prompt`. Results are kept in a small LRU cache keyed by prompt,
images, template, settings and the weights' identity, so re-queuing a prompt does not re-run the model; the
vision tower's features of the last pictures are kept too (`VISION_CACHE`), so the negative prompt of an edit
(a second node with the same pictures) does not run the vision tower again.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .checkpoint import CheckpointError, open_checkpoint
from .formats import gguf, qwen_vl_gguf
from .formats.common import assign_weights
from .formats.qwen_vl import encoder_markers, encoder_names, encoder_shapes, encoder_weights, read_config
from .prompts import (
    IMAGE_PAD,
    MAX_PIXELS,
    MIN_PIXELS,
    PAD,
    T2I_DEFAULT_MAX_TOKENS,
    TEMPLATES,
    find_tokenizer,
    load_tokenizer,
    rope_index,
    template_text,
    to_pil,
    vision_patches,
)
from .qwen_vl import QwenVL, QwenVLConfig

WHAT = "Qwen2.5-VL text encoder"


def _as_image_list(images) -> list:
    """None, one image, a list of images, or a ComfyUI IMAGE batch [B, H, W, C] -> a list of images."""
    if images is None:
        return []
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _weights_id(path: Path, extra: Sequence[Path] = ()) -> str:
    files = (sorted(path.glob("*.safetensors")) if path.is_dir() else [path]) + list(extra)
    return "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


VISION_CACHE = 2  # picture sets whose vision features are kept (an edit's prompt and negative prompt share one;
# none when the encoder's cache_size is 0)


class TextEncoder:
    """A loaded Qwen2.5-VL encoder with its tokenizer and an embedding cache."""

    def __init__(self, model: QwenVL, tokenizer, weights_id: str, source: str = "", cache_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.weights_id = weights_id  # part of every cache key
        self.source = source  # the file or folder, for messages
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._vision: OrderedDict[tuple, tuple[torch.Tensor, list]] = OrderedDict()  # -> (features, grids)

    @property
    def has_vision(self) -> bool:
        return self.model.visual is not None

    def clear_cache(self) -> None:
        self._cache.clear()
        self._vision.clear()

    def encode(
        self,
        prompts: str | Sequence[str],
        images=None,
        template: str = "t2i",
        *,
        max_sequence_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        check: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, T, hidden] (in `dtype`) and mask [B, T] bool for a batch of prompts.

        template: "t2i", "edit" (exactly one image) or "edit_plus" (any number, "Picture N: " each).
        images: the VL copies (already resized by the pipeline, see `prompts.resize_for_edit`), shared by
        every prompt. max_sequence_length: kept tokens per prompt; None means the reference's default
        (512 for t2i, as diffusers' pipeline; no limit for the edit templates). Longer prompts are
        truncated with a warning. t2i never keeps more than 1024 tokens (diffusers' tokenizer limit).
        check: called between the layers of both towers; raise from it to stop (a host's interrupt check).
        """
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [to_pil(im) for im in _as_image_list(images)]
        if images and not self.has_vision:
            raise ValueError(
                getattr(self.model, "vision_note", None)
                or f"{self.source}: this text-encoder file has no vision tower (no visual.* weights), so it can "
                "encode text-to-image prompts only; for editing load the full Qwen2.5-VL-7B file "
                "(e.g. ComfyUI's qwen_2.5_vl_7b.safetensors or a diffusers text_encoder/ folder)"
            )
        limit = self._limit(template, max_sequence_length)
        device = torch.device(device) if device is not None else self.model.model.norm.weight.device
        settings = (template, limit, str(dtype), str(device), min_pixels, max_pixels, self.weights_id)
        image_key = tuple(hashlib.sha1(im.tobytes()).hexdigest() + f"{im.size}" for im in images)
        keys = [(p, image_key, *settings) for p in prompts]

        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            rows = self._run(
                [k[0] for k in todo],
                images,
                template,
                limit,
                dtype,
                device,
                min_pixels,
                max_pixels,
                check,
                vision_key=(image_key, *settings[2:]),
            )
            for k, r in zip(todo, rows, strict=True):
                self._cache[k] = r
        results = []
        for k in keys:
            self._cache.move_to_end(k)
            results.append(self._cache[k])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

        longest = max(r.shape[0] for r in results)
        embeds = results[0].new_zeros(len(results), longest, results[0].shape[1])
        mask = torch.zeros(len(results), longest, dtype=torch.bool, device=results[0].device)
        for i, r in enumerate(results):
            embeds[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return embeds, mask

    def _vision_features(self, images, dtype, device, min_pixels, max_pixels, check, key) -> tuple[torch.Tensor, list]:
        """The vision tower's merged features [M, hidden] and grids of `images`, from the last VISION_CACHE picture
        sets when `key` (pictures, dtype, device, pixel limits, weights) was seen."""
        if key is not None and key in self._vision:
            self._vision.move_to_end(key)
            return self._vision[key]
        pix = [vision_patches(im, min_pixels, max_pixels) for im in images]
        grids = [g for _, g in pix]
        patches = torch.cat([p for p, _ in pix]).to(device=device, dtype=dtype)
        out = self.model.encode_images(patches, grids, check), grids  # [M, hidden]
        keep = min(VISION_CACHE, self.cache_size)  # cache_size 0: no caching at all
        if key is not None and keep:
            self._vision[key] = out
            while len(self._vision) > keep:
                self._vision.popitem(last=False)
        return out

    @staticmethod
    def _limit(template: str, requested: int | None) -> int | None:
        cap = TEMPLATES[template].max_tokens
        if requested is None:
            return T2I_DEFAULT_MAX_TOKENS if template == "t2i" else None
        if cap is not None and requested > cap:
            warnings.warn(
                f"max_sequence_length {requested} exceeds the reference limit {cap}; using {cap}", stacklevel=3
            )
            return cap
        return requested

    @torch.inference_mode()
    def _run(
        self, prompts, images, template, limit, dtype, device, min_pixels, max_pixels, check=None, vision_key=None
    ) -> list[torch.Tensor]:
        """Encode prompts not in the cache: one batched pass; returns each prompt's kept rows [T_i, hidden]."""
        drop = TEMPLATES[template].drop
        feats, grids = None, []
        if images:
            feats, grids = self._vision_features(images, dtype, device, min_pixels, max_pixels, check, vision_key)
        counts = [t * h * w // self.model.visual.cfg.merge_size**2 for t, h, w in grids] if images else []

        rows = []
        for text in (template_text(template, p, len(images)) for p in prompts):
            ids = self.tokenizer(text)["input_ids"]
            if ids.count(IMAGE_PAD) != len(images):
                raise ValueError(
                    f"the prompt text holds {ids.count(IMAGE_PAD) - len(images)} extra <|image_pad|> tokens; "
                    "images are placed by the template, remove them from the prompt"
                )
            expanded, k = [], 0
            for t in ids:  # each <|image_pad|> becomes one token per merged image patch
                if t == IMAGE_PAD:
                    expanded += [IMAGE_PAD] * counts[k]
                    k += 1
                else:
                    expanded.append(t)
            if limit is not None and len(expanded) - drop > limit:
                warnings.warn(
                    f"prompt is {len(expanded) - drop} tokens long; only the first {limit} are used "
                    f"(the reference's limit for template {template!r})",
                    stacklevel=4,
                )
                if not images:  # causal model: cutting the input first gives the same kept rows
                    expanded = expanded[: drop + limit]
            rows.append(expanded)

        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD] * (n - len(r)) for r in rows], device=device)  # right padding
        positions = rope_index(ids, grids)
        image_mask = ids == IMAGE_PAD
        image_embeds = feats.repeat(len(rows), 1) if feats is not None else None
        hidden = self.model(ids, positions, dtype, image_embeds, image_mask if feats is not None else None, check)
        end = [len(r) if limit is None else min(len(r), drop + limit) for r in rows]
        return [hidden[i, drop : end[i]].clone() for i in range(len(rows))]


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer=None,
    cache_size: int = 16,
    *,
    mmap: bool = False,
    vision: dict | None = None,
    mmproj: str | os.PathLike | bool | None = None,
    **sizes,
) -> TextEncoder:
    """Load a Qwen2.5-VL encoder from any supported file or folder.

    tokenizer: a loaded tokenizer, a folder to search (see `prompts.find_tokenizer`), or None to search
    next to the weights and in an importable ComfyUI. Float8 weights stay float8 (dequantised per layer).
    Weights are read into process memory (`mmap=True`: views of the mapped file, see `checkpoint`).
    Sizes come from `sizes` (QwenVLConfig fields, e.g. num_heads=16, mrope_section=(8, 12, 12)) and
    `vision` (VisionConfig fields), then the folder's config.json, then the shapes (see `formats.qwen_vl`).
    A llama.cpp GGUF (`*.gguf`, see `formats.qwen_vl_gguf`) takes its sizes from its metadata and its vision
    tower from an mmproj GGUF: `mmproj` None looks next to it, a path names it, False loads text only.
    """
    unknown = sorted(set(sizes) - set(QwenVLConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load_text_encoder: unknown size {', '.join(unknown)}; expected QwenVLConfig fields")
    path = Path(path)
    source = None  # a GGUF encoder's files (formats.qwen_vl_gguf)
    if gguf.is_gguf(path):
        source = qwen_vl_gguf.open_encoder(path, mmproj, mmap)
        where, shapes, known, files = path, source.shapes(), dict(source.known), source.files[1:]
    elif mmproj is not None:
        raise TypeError(f"load_text_encoder: mmproj is for GGUF text encoders, not {path.name}")
    else:
        ckpt = open_checkpoint(path, mmap=mmap)
        names = encoder_names(ckpt)
        markers = encoder_markers(ckpt, names)
        where, known, files = ckpt.path, read_config(path, ckpt.metadata), []
        shapes = encoder_shapes(ckpt, names, markers)
    known.update({k: v for k, v in sizes.items() if v is not None})
    known["vision"] = {**known.get("vision", {}), **(vision or {})}
    try:
        cfg = QwenVLConfig.from_shapes(shapes, where, **known)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: inconsistent {WHAT} sizes ({e})") from None
    if source is not None:
        (weights, packed), scales, storage = source.weights(), {}, source.storage
    else:
        weights, scales, packed, storage = encoder_weights(ckpt, names, markers)
    with torch.device("meta"):
        model = QwenVL(cfg)
    assign_weights(model, weights, scales, where, WHAT, packed)
    model.storage, model.path = storage, where
    model.vision_note = source.note if source is not None else None  # why an edit cannot run, where it cannot
    model.eval().requires_grad_(False)
    if tokenizer is None:
        tokenizer = load_tokenizer(find_tokenizer(None, search=[path]))
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(find_tokenizer(tokenizer))
    return TextEncoder(model, tokenizer, _weights_id(path, files), source=str(path), cache_size=cache_size)
