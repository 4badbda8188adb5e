"""The seam between ComfyUI and qwen_image_core: model folders, devices, progress, interrupts, data layouts.

Every ComfyUI import of the pack's runtime goes through here, so the node classes stay declarations.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import comfy.cli_args
import comfy.model_base
import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..qwen_image_core.checkpoint import CheckpointError, file_stamp
from ..qwen_image_core.formats.qwen_vl_gguf import find_mmproj
from ..qwen_image_core.progress import loading
from ..qwen_image_core.text_encoder import TextEncoder
from ..qwen_image_core.vae import denormalize_latents, normalize_latents
from . import placement
from .checks import InputError, scrub_paths
from .progress import check_interrupt as check_interrupt  # the cancel button, host.check_interrupt for the nodes
from .progress import node_progress

PACK = "QwenPix"
DIFFUSERS_FOLDER = "diffusers"  # ComfyUI's models/diffusers: whole diffusers repos of Qwen/Qwen-Image*
DIFFUSERS_PREFIX = "diffusers/"  # how such a repo is listed among single files
# GGUF files in a model folder, listed as ComfyUI-GGUF lists them: a folder key over the same paths with the .gguf
# extension (the same key, so both packs see the same list); the folder's own key keeps its extensions
GGUF_KEYS = {"diffusion_models": "unet_gguf", "text_encoders": "clip_gguf"}
# GGUF files not listed: llama.cpp's vision towers (mmproj), which the text-encoder loader finds next to their
# language model (as ComfyUI-GGUF does)
GGUF_UNLISTED = {"text_encoders": "mmproj"}


# -- model handles (the pack adds two types: the text encoder and the VAE; the DiT is a native MODEL)
def qwen_diffusion_model(model, name: str) -> torch.nn.Module:
    """The diffusion model inside a MODEL input, checked to be Qwen-Image (ours or ComfyUI's own)."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, comfy.model_base.QwenImage):
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        raise InputError(
            f"{name}: this MODEL is a {kind} model, not Qwen-Image\nFix: connect a Qwen-Image diffusion model "
            "(Load Qwen-Image Diffusion Model, or UNETLoader with a qwen_image file)"
        )
    return inner.diffusion_model


@dataclass(frozen=True)
class TextEncoderHandle:
    """A loaded text encoder (with its embedding cache) and the patcher that registers it with ComfyUI's model
    management (`placement.text_encoder_patcher`)."""

    encoder: TextEncoder
    patcher: object

    def __repr__(self) -> str:  # ComfyUI sends str(input) to API clients with errors: short, no module path
        return "TextEncoderHandle(Qwen2.5-VL)"

    def encode(self, prompts: list[str], images, template: str) -> torch.Tensor:
        """Embeddings [B, T, 3584] of prompts, computed on ComfyUI's device (streamed if VRAM is short)."""
        device = placement.load_text_encoder(self.patcher, len(images or ()))  # ComfyUI places it (or keeps it)
        embeds, _ = self.encoder.encode(prompts, images, template, device=device, check=node_progress())
        return embeds


# -- model files
def model_names(folder: str, repo_part: str) -> list[str]:
    """Files in a ComfyUI model folder (and its .gguf files, see GGUF_KEYS), plus diffusers repos
    (models/diffusers/<name>/<repo_part>/)."""
    names = list(folder_paths.get_filename_list(folder))
    gguf = GGUF_KEYS.get(folder)
    if gguf is not None:
        if gguf not in folder_paths.folder_names_and_paths:  # the folder's own path list, shared as ComfyUI-GGUF does
            folder_paths.folder_names_and_paths[gguf] = (folder_paths.folder_names_and_paths[folder][0], {".gguf"})
        hidden = GGUF_UNLISTED.get(folder)
        names += [n for n in folder_paths.get_filename_list(gguf) if not (hidden and hidden in Path(n).name.lower())]
    for root in (
        folder_paths.get_folder_paths(DIFFUSERS_FOLDER)
        if DIFFUSERS_FOLDER in folder_paths.folder_names_and_paths
        else []
    ):
        if os.path.isdir(root):
            names += sorted(
                DIFFUSERS_PREFIX + d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, repo_part))
            )
    return names


def model_path(folder: str, name: str, repo_part: str) -> Path:
    """The file or folder behind a listed name. Only names inside ComfyUI's model folders resolve."""
    if name.startswith(DIFFUSERS_PREFIX):
        repo = name[len(DIFFUSERS_PREFIX) :]
        for root in folder_paths.get_folder_paths(DIFFUSERS_FOLDER):
            candidate = Path(root, repo, repo_part)
            if "/" not in repo and "\\" not in repo and repo not in ("", ".", "..") and candidate.is_dir():
                return candidate
        raise FileNotFoundError(f"no diffusers repo '{repo}' with a {repo_part}/ folder in models/{DIFFUSERS_FOLDER}")
    return Path(folder_paths.get_full_path_or_raise(folder, name))


@contextmanager
def input_problem(name: str, value, fix: str) -> Iterator[None]:
    """Turn a core error about a file or value into one that names the node input and says what to do.

    ComfyUI shows it in the node's execution_error (which already carries the node id and type).
    """
    try:
        yield
    except InputError:
        raise
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise InputError(f"{name} '{value}': {e}\nFix: {fix}") from e


def path_roots() -> dict[str, str]:
    """Absolute directories a message may name, and how they are shown: ComfyUI's model folders (and any extra
    model paths) as `models/<folder>`; the models directory itself as `models`."""
    roots = {}
    for folder, (paths, _) in folder_paths.folder_names_and_paths.items():
        if folder == "custom_nodes":  # code, not models: shown by base name like any other path
            continue
        for p in paths:
            roots[os.path.abspath(p)] = f"models/{folder}"
    models = os.path.abspath(folder_paths.models_dir)
    for p in list(roots):  # folders inside the models directory keep their real relative path
        if p.startswith(models + os.sep):
            roots[p] = "models/" + os.path.relpath(p, models).replace(os.sep, "/")
    roots[models] = "models"
    return roots


def public_error(e: BaseException) -> BaseException:
    """`e` itself, or an exception of the same type whose message has no absolute server path (see
    `checks.scrub_paths`): what an API client receives is the message, and paths of the server's disks are not its
    business. Interrupts and errors without a path pass unchanged."""
    if isinstance(e, comfy.model_management.InterruptProcessingException):
        return e
    text = str(e)
    clean = scrub_paths(text, path_roots())
    if clean == text:
        return e
    try:
        new = type(e)(clean)
        if str(new) != clean:
            raise TypeError
    except Exception:
        new = InputError(clean)
    return new


def file_identity(path: Path) -> tuple:
    """What a loaded model depends on: the resolved path and, for the file or each file of a folder, its size,
    mtime, ctime, inode and device. Any rewrite, truncation or replacement changes it (ctime cannot be set
    back by copying tools the way mtime can). Raises FileNotFoundError when the file or folder is gone."""
    path = path.resolve(strict=True)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return str(path), tuple((str(f.relative_to(path)) if f != path else "", *file_stamp(f.stat())) for f in files)


def companions(folder: str, path: Path) -> tuple[Path, ...]:
    """Files a model file is loaded with: a GGUF text encoder's mmproj (its vision tower) next to it."""
    if folder != "text_encoders" or path.suffix.lower() != ".gguf" or not path.is_file():
        return ()
    with warnings.catch_warnings():  # the loader warns about an ambiguous choice; this only follows it
        warnings.simplefilter("ignore")
        found = find_mmproj(path)[0]
    return (found,) if found is not None else ()


def with_companions(identity: tuple, extra: tuple[Path, ...]) -> tuple:
    """A file's identity with the identities of the files it loads with (a change in any reloads it)."""
    return identity[0], identity[1] + tuple(file_identity(p) for p in extra)


def model_fingerprint(folder: str, name: str, repo_part: str):
    """A loader's IS_CHANGED value: the identity of the file behind `name`, so ComfyUI runs the loader again
    (instead of reusing its cached output) when the file changed on disk; NaN (never equal, always run: the
    loader then reports the problem) when the name does not resolve to an existing file. Hashed: a short value
    that names no server path."""
    try:
        path = model_path(folder, name, repo_part)
        identity = with_companions(file_identity(path), companions(folder, path))
        return hashlib.sha256(repr(identity).encode()).hexdigest()
    except Exception:  # the loader itself turns every such case into a clear error
        return float("nan")


class ModelCache:
    """Loaded models by (kind, file identity): a file named by two prompts is loaded once.

    Every model still alive (held by ComfyUI's node cache or a running prompt) is found through a weak
    reference; besides, the most recently used model of each kind is held strongly, so a following prompt
    reuses it even when ComfyUI's cache dropped it (other loader inputs, --cache-none). A changed file (see
    `file_identity`) is loaded again (logged), or refused with the reader's error if it is now broken; a file
    that changes while it is being loaded is refused. Weights live in process memory (the reader copies
    them), so a model in use never depends on its file. One instance lives in this module, the host seam;
    ComfyUI runs prompts one at a time, a lock covers the rest.
    """

    def __init__(self, keep_per_kind: int = 1):
        self.keep_per_kind = keep_per_kind
        self._strong: OrderedDict[tuple, object] = OrderedDict()
        self._alive: weakref.WeakValueDictionary[tuple, object] = weakref.WeakValueDictionary()
        self._seen: dict[tuple[str, str], tuple] = {}  # (kind, resolved path) -> identity last loaded
        self._lock = threading.Lock()

    def get(self, kind: str, path: Path, load: Callable[[], object], extra: tuple[Path, ...] = ()):
        """The model of `path` (and of the files it loads with, `extra`: part of its identity), loaded once."""
        try:
            identity = with_companions(file_identity(path), extra)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file or folder (was it moved or deleted?)") from None
        key = (kind, identity)
        with self._lock:
            value = self._alive.get(key)
            if value is not None:
                self._keep(key, value)
                logging.info("QwenPix: reusing the loaded %s %s", kind, path)
                return value
            before = self._seen.get((kind, identity[0]))
            for old in [k for k in self._strong if k[0] == kind and k[1][0] == identity[0]]:
                del self._strong[old]  # the old version of this file: let it go as soon as nothing uses it
        if before is not None:
            logging.info("QwenPix: %s %s changed on disk since it was loaded; loading it again", kind, path)
        logging.info("QwenPix: loading %s %s", kind, path)
        with loading(node_progress()):  # the loader node's progress bar, per tensor group read; interruptible
            value = load()
        try:
            after = with_companions(file_identity(path), extra)
        except FileNotFoundError:
            after = None
        if after != identity:
            raise CheckpointError(
                f"{path}: the file changed on disk while it was being loaded; wait until the copy or download has "
                "finished and queue the prompt again"
            )
        with self._lock:
            self._alive[key] = value
            self._seen[(kind, identity[0])] = identity
            self._keep(key, value)
        return value

    def _keep(self, key: tuple, value) -> None:
        self._strong.pop(key, None)
        self._strong[key] = value
        for old in [k for k in self._strong if k[0] == key[0]][: -self.keep_per_kind]:
            del self._strong[old]

    def clear(self) -> None:
        with self._lock:
            self._strong.clear()


MODELS = ModelCache()


def comfy_tokenizer_dir() -> Path:
    """The Qwen2.5 tokenizer that ships with ComfyUI (comfy/text_encoders/qwen25_tokenizer)."""
    return Path(folder_paths.__file__).parent / "comfy" / "text_encoders" / "qwen25_tokenizer"


# -- devices and dtypes
def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()


def intermediate_device() -> torch.device:
    """Where ComfyUI keeps tensors passed between nodes."""
    return comfy.model_management.intermediate_device()


def memory_room(device: torch.device) -> int:
    """Bytes a job may count on: RAM available now on the CPU; on a GPU its total (ComfyUI frees its models
    first, and the DiT's weights can stream), so only jobs that can never fit are refused."""
    if device.type == "cpu":
        return comfy.model_management.get_free_memory(device)
    return comfy.model_management.get_total_memory(device)


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16


# -- ComfyUI's latent and image layouts
def latent_to_core(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT samples (raw, [B, 16, 1, h, w] or [B, 16, h, w]) -> normalised [B, 16, h, w] float32."""
    if samples.ndim == 5:
        if samples.shape[2] != 1:
            raise ValueError(f"expected a one-frame image latent, got {samples.shape[2]} frames")
        samples = samples[:, :, 0]
    if samples.ndim != 4 or samples.shape[1] != 16:
        raise ValueError(f"expected a 16-channel Qwen-Image latent, got shape {list(samples.shape)}")
    return normalize_latents(samples.float())


def latent_to_comfy(latents: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 16, h, w] -> ComfyUI's raw one-frame layout [B, 16, 1, h, w] on the intermediate device."""
    raw = denormalize_latents(latents.float())
    return raw.unsqueeze(2).to(intermediate_device())


def image_to_core(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> [B, 3, H, W] in [-1, 1] (alpha dropped)."""
    return image[..., :3].movedim(-1, 1).float() * 2 - 1


def image_to_comfy(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> ComfyUI IMAGE [B, H, W, 3] in [0, 1]."""
    out = (images.float() / 2 + 0.5).clamp(0, 1).movedim(1, -1)
    return out.to(intermediate_device())
