"""QwenPix: ComfyUI entry point. The nodes live in nodes/, the model code in qwen_image_core/.

The node modules import ComfyUI, so they are imported when ComfyUI asks for the mappings, not when this
package is imported (which keeps the folder importable by tools such as pytest outside ComfyUI).
"""

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def __getattr__(name: str):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(name)
