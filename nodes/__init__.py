"""ComfyUI node classes (V1 node API): thin wrappers that parse inputs and call qwen_image_core."""

from . import conditioning, controlnet, image, inpaint, latent, layered, loaders, parallel, qwen21, sampler, seam

_MODULES = (loaders, conditioning, latent, sampler, image, layered, parallel, inpaint, controlnet, qwen21)

# each class behind the node seam (handle checks, no server paths in messages): see seam.py
NODE_CLASS_MAPPINGS = {name: seam.wrap(cls) for m in _MODULES for name, cls in m.NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: cls.DISPLAY_NAME for name, cls in NODE_CLASS_MAPPINGS.items()}
