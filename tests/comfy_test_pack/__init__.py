"""Test-only ComfyUI nodes: conditioning tensors from a seed, to drive samplers without a 7B text encoder.

Linked into the test server's custom_nodes next to the pack; never shipped.
"""

import torch


class QwenPixTestConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "tokens": ("INT", {"default": 7, "min": 1, "max": 4096}),
                "dim": ("INT", {"default": 3584, "min": 1, "max": 8192}),
            }
        }

    def make(self, seed, tokens, dim):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, dim, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"QwenPixTestConditioning": QwenPixTestConditioning}


class QwenPixTestDumpImage:
    """Saves an IMAGE tensor exactly (float32 .npy in the output folder), for comparisons finer than PNG."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "dump"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "dump"})}}

    def dump(self, images, name):
        import os

        import folder_paths
        import numpy as np

        path = os.path.join(folder_paths.get_output_directory(), f"{name}.npy")
        np.save(path, images.float().cpu().numpy())
        return {"ui": {"dumps": [name]}}


NODE_CLASS_MAPPINGS["QwenPixTestDumpImage"] = QwenPixTestDumpImage
