"""Quantised files of other tools, recognised by their tensor names, so a loader can name what it refuses.

Each entry: the key suffixes that identify the format (all of them present in the file, each on some key),
what the file is, and what to use instead. Checked in order, before the key set is compared with a model.
GGUF and pickle files are recognised by their first bytes in `checkpoint` (they are not safetensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# (suffixes that must all occur, what it is, what to do)
FOREIGN: tuple[tuple[tuple[str, ...], str, str], ...] = (
    # nunchaku/models/linear.py SVDQW4A4Linear: qweight, wscales, smooth_factor, proj_down, proj_up (+ wcscales)
    ((".qweight", ".wscales", ".proj_down", ".proj_up"), "a Nunchaku SVDQuant file", "use ComfyUI-nunchaku"),
    ((".qweight", ".wscales", ".smooth_factor"), "a Nunchaku SVDQuant file", "use ComfyUI-nunchaku"),
    # nunchaku AWQW4A16Linear alone (its modulation layers)
    ((".qweight", ".wscales", ".wzeros"), "a Nunchaku (AWQ W4A16) file", "use ComfyUI-nunchaku"),
    # bitsandbytes 4-bit (Params4bit.quant_state) and LLM.int8 (SCB) serialisations
    ((".absmax", ".quant_map"), "a bitsandbytes NF4/FP4 file", "use a loader with bitsandbytes support"),
    ((".SCB",), "a bitsandbytes LLM.int8 file", "use a loader with bitsandbytes support"),
    # GPTQ / AutoAWQ (transformers-style QuantLinear: qweight, qzeros, scales)
    ((".qweight", ".qzeros", ".scales"), "a GPTQ / AutoAWQ file", "use a bf16, fp8 or comfy_quant (int8) file"),
    # compressed-tensors (llm-compressor) packed weights
    ((".weight_packed", ".weight_scale"), "a compressed-tensors (llm-compressor) file", "use a bf16 or fp8 file"),
)
# safetensors metadata some of them write: (key, value fragment, what it is, what to do)
FOREIGN_METADATA = (("quantization_config", "svdquant", "a Nunchaku SVDQuant file", "use ComfyUI-nunchaku"),)


def identify(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """'<what it is>: <what to do>' when the keys (or metadata) belong to another tool's quantised format."""
    keys = list(keys)
    for key, fragment, what, advice in FOREIGN_METADATA:
        if fragment in str((metadata or {}).get(key, "")).lower():
            return f"{what}: {advice}"
    for suffixes, what, advice in FOREIGN:
        if all(any(k.endswith(s) for k in keys) for s in suffixes):
            return f"{what}: {advice}"
    return None
