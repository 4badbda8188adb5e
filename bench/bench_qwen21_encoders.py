"""Qwen-Image-2.1's condition encoder and VAE on this machine's CPU: ours vs the references (random weights).

    .venv/bin/python bench/bench_qwen21_encoders.py            # both tables
    .venv/bin/python bench/bench_qwen21_encoders.py --quick    # smaller sizes (a smoke run)

* Qwen3-VL encode: our `Qwen3VL` vs transformers' `Qwen3VLForConditionalGeneration` (sdpa), the same weights, at
  the real widths (hidden 4096, SwiGLU 12288, 32/8 heads; vision 1152 wide, 16 heads) but `--layers` decoder
  layers and `--vision-blocks` vision blocks (the real 36 / 27 do not fit this machine's memory in float32;
  time per layer is what the ratio compares), a 64-entry vocabulary; one prompt of `--tokens` text tokens with
  one reference of `--image` pixels square (its merged tokens added), features as the reference takes them.
* 2.1 VAE decode: our `ImageVAE21` (2D) vs diffusers' `AutoencoderKLQwenImage21` at the real config, one
  `--decode` px square image (latents 64 x side/16; 256 by default: the real decoder takes ~25 s per 256² image
  on one core of this machine).

Each row: the best of `--repeat` runs after one warm-up, float32, torch threads as set (`--threads`).
Results are printed and written to bench/results/qwen21_encoders.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best(fn, repeat: int) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)


def bench_encoder(args) -> dict:
    from qwen_image_core.prompts import IMAGE_PAD, VISION_END, VISION_START, rope_index
    from qwen_image_core.qwen21.qwen3_vl import Qwen3VL, Qwen3VLConfig
    from qwen_image_core.qwen21.vision3 import Vision3Config
    from tools.checkpoints import qwen3_vl as W

    text = dict(vocab_size=IMAGE_PAD + 1, hidden_size=4096, intermediate_size=12288, num_hidden_layers=args.layers,
                num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
    deepstack = list(range(min(3, args.vision_blocks)))
    vision = dict(depth=args.vision_blocks, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  num_position_embeddings=2304, deepstack_visual_indexes=deepstack)  # fmt: skip
    ref = W.reference_model(text=text, vision=vision, exact_in=None)
    v = vision
    cfg = Qwen3VLConfig(
        vocab_size=text["vocab_size"], num_layers=args.layers,
        vision=Vision3Config(depth=v["depth"], deepstack_layers=tuple(v["deepstack_visual_indexes"])),
    )  # fmt: skip
    with torch.device("meta"):
        ours = Qwen3VL(cfg)
    ours.load_state_dict({k: v for k, v in W.legacy_state_dict(ref).items() if not k.startswith("lm_head")},
                         assign=True)  # fmt: skip
    ours.eval()
    import numpy as np
    from PIL import Image

    from qwen_image_core.qwen21.prompts import vision_patches21

    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (args.image, args.image, 3), dtype=np.uint8))
    patches, grid = vision_patches21(img)
    count = grid[1] * grid[2] // 4
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 1000, (args.tokens,), generator=g).tolist()
    ids = torch.tensor([words[:8] + [VISION_START] + [IMAGE_PAD] * count + [VISION_END] + words[8:]])
    grids = torch.tensor([grid])
    norm = ref.model.language_model.norm
    norm.register_forward_hook(lambda m, a, o: a[0])

    def theirs():
        ref(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=patches, image_grid_thw=grids,
            mm_token_type_ids=(ids == IMAGE_PAD).int(), output_hidden_states=True)  # fmt: skip

    def mine():
        feats = ours.encode_images(patches, [grid])
        ours(ids, rope_index(ids, [grid]), torch.float32, feats, ids == IMAGE_PAD)

    t_ref, t_ours = best(theirs, args.repeat), best(mine, args.repeat)
    what = f"Qwen3-VL encode: {ids.shape[1]} tokens ({count} image), {args.layers} layers, "
    what += f"{args.vision_blocks} vision blocks"
    return dict(what=what, ours_s=t_ours, reference_s=t_ref, ratio=t_ours / t_ref)


def bench_vae(args) -> dict:
    from diffusers import AutoencoderKLQwenImage21

    from qwen_image_core.formats.vae import image_weights
    from qwen_image_core.qwen21.vae import ImageVAE21, VAE21Config
    from tools.checkpoints.vae21 import diffusers_config, random_weights

    cfg = VAE21Config()
    weights = random_weights(cfg)
    ref = AutoencoderKLQwenImage21(**diffusers_config(cfg)).eval()
    ref.load_state_dict(weights, strict=True)
    ours = ImageVAE21(cfg)
    ours.load_state_dict(image_weights(weights), strict=True)
    ours.eval()
    z = torch.randn(1, 64, args.decode // 16, args.decode // 16, generator=torch.Generator().manual_seed(0))
    t_ref = best(lambda: ref.decode(z[:, :, None]), args.repeat)
    t_ours = best(lambda: ours.decode(z, tile=False), args.repeat)
    return dict(what=f"2.1 VAE decode {args.decode}x{args.decode}", ours_s=t_ours, reference_s=t_ref,
                ratio=t_ours / t_ref)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-blocks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--image", type=int, default=512)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.layers, args.vision_blocks, args.tokens, args.image, args.decode, args.repeat = 1, 1, 64, 256, 256, 1
    torch.set_num_threads(args.threads)
    rows = [bench_encoder(args), bench_vae(args)]
    print(f"CPU, float32, {args.threads} threads; best of {args.repeat}")
    print(f"{'what':<78} {'ours s':>8} {'ref s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['what']:<78} {r['ours_s']:8.3f} {r['reference_s']:8.3f} {r['ratio']:6.2f}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "qwen21_encoders.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
