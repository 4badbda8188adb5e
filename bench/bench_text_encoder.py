"""Text-encoder benchmark on this machine at a mid-size Qwen2.5-VL config (random weights).

    .venv/bin/python bench/bench_text_encoder.py [--layers 8] [--hidden 1024] [--tokens 200] [--threads 2]

Writes one random model (real vocabulary 152064; `--hidden` wide, `--layers` deep, 128-wide heads, GQA
4:1) as a ComfyUI bf16 single file, a ComfyUI fp8_scaled file and a diffusers bf16 `text_encoder/` folder,
then times, each in a fresh subprocess, loading and encoding one text-to-image prompt in float32:
ours from the bf16 file, ours from the fp8_scaled file, and transformers' Qwen2_5_VLForConditionalGeneration
from the folder (`dtype=float32`, as it must compute), once as its base model (hidden states only) and
once as diffusers' encode_prompt calls it (the whole model, which also computes vocabulary logits).
"encode" is the best of 5 runs after a warm-up (the machine is shared: the minimum is the least
disturbed; our embedding cache is cleared between runs); "peak RSS" is the process's whole peak (torch +
weights + activations); "RSS after load" is the resident size right after loading, before any encode
(our weights are read into memory at load; `load_text_encoder(..., mmap=True)` would page them in on use).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / ".comfyui" / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer"


def rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes."""
    lines = Path("/proc/self/status").read_text().split("\n")
    get = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in lines if ln.startswith(("VmRSS", "VmHWM"))}
    return get["VmRSS"], get["VmHWM"]


def prompt(tokens: int) -> str:
    words = "a quiet harbour town at dusk with lanterns boats gulls and a lighthouse on the rocks".split()
    return " ".join(words[i % len(words)] for i in range(tokens))


def write(folder: Path, hidden: int, layers: int) -> None:
    from tools.checkpoints import qwen_vl as W

    text = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
    )
    model = W.reference_model(seed=0, text=text)
    sd = W.legacy_state_dict(model)
    W.write_comfy_single(folder / "qwen_vl_bf16.safetensors", sd)
    W.write_comfy_fp8_scaled(folder / "qwen_vl_fp8_scaled.safetensors", sd)
    W.write_hf_folder(folder / "text_encoder", model)


def run(impl: str, folder: Path, tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    text = prompt(tokens)
    t0 = time.perf_counter()
    if impl.startswith("ours"):
        from qwen_image_core.text_encoder import load_text_encoder

        name = "qwen_vl_fp8_scaled.safetensors" if impl == "ours-fp8" else "qwen_vl_bf16.safetensors"
        te = load_text_encoder(folder / name, tokenizer=TOKENIZER)

        def encode():
            te.clear_cache()
            return te.encode(text, max_sequence_length=1024)[0].shape[1]
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        from qwen_image_core.prompts import TEMPLATES

        tok = Qwen2Tokenizer.from_pretrained(str(TOKENIZER))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32)
        model.eval()
        ids = tok(TEMPLATES["t2i"].text.format(text), return_tensors="pt")

        def encode():
            with torch.no_grad():
                if impl == "transformers":  # the base model: final-normed hidden states, no lm_head
                    out = model.model(**ids).last_hidden_state[:, 34:]
                else:  # as diffusers' encode_prompt calls it: the full model, logits over the vocabulary too
                    out = model(**ids, output_hidden_states=True).hidden_states[-1][:, 34:]
            return out.shape[1]

    load_s = time.perf_counter() - t0
    weights = rss()[0]
    kept = encode()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        encode()
        times.append(time.perf_counter() - t)
    return {
        "impl": impl,
        "load_s": load_s,
        "encode_s": min(times),
        "kept": kept,
        "weights_gb": weights / 1e9,
        "peak_gb": rss()[1] / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run(args.run, Path(args.dir), args.tokens, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        write(folder, args.hidden, args.layers)
        print(
            f"wrote hidden {args.hidden}, {args.layers} layers in {time.perf_counter() - t:.1f} s; "
            f"{args.tokens}-word prompt, float32 compute, {args.threads} threads"
        )
        print(f"| {'implementation':<50} | load s | encode s | tokens | RSS after load GB | peak RSS GB |")
        print(f"| {'-' * 50} | ------ | -------- | ------ | ----------------- | ----------- |")
        names = {
            "ours": "ours (ComfyUI bf16 file)",
            "ours-fp8": "ours (ComfyUI fp8_scaled file)",
            "transformers": "transformers 5.23 base model (HF folder, fp32)",
            "transformers-logits": "transformers 5.23 + lm_head, as diffusers calls it",
        }
        for impl in names:
            cmd = [
                sys.executable,
                __file__,
                "--run",
                impl,
                "--dir",
                str(folder),
                "--tokens",
                str(args.tokens),
                "--threads",
                str(args.threads),
            ]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(
                f"| {names[impl]:<50} | {r['load_s']:6.2f} | {r['encode_s']:8.3f} | {r['kept']:6d} "
                f"| {r['weights_gb']:17.2f} | {r['peak_gb']:11.2f} |"
            )


if __name__ == "__main__":
    main()
