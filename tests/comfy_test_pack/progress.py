"""A test node that interrupts the prompt at the n-th progress report of a later node (e.g. a loader, whose work has
no modules to hook): it passes a value through (link it into the node to interrupt, so that node runs after it)."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
from comfy_execution.utils import get_executing_context


class _AnyType(str):
    def __ne__(self, other):  # ComfyUI's validation matches it with every type (a combo input too)
        return False

    __hash__ = str.__hash__


ANY = _AnyType("*")


class QwenPixTestInterruptAtProgress:
    """Wraps ComfyUI's progress hook for the rest of this prompt: at the `at`-th progress report it raises the
    interrupt flag (the hook then stops the prompt, as the cancel button would) and puts the hook back. A report
    from another prompt puts it back untouched, so nothing outlives the test's prompt."""

    CATEGORY = "testing"
    RETURN_TYPES = (ANY,)
    FUNCTION = "arm"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "value": ("STRING", {"default": ""}),
                "at": ("INT", {"default": 1, "min": 1, "max": 10000}),
                "salt": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            }
        }

    def arm(self, value, at, salt):
        original = comfy.utils.PROGRESS_BAR_HOOK
        prompt_id = get_executing_context().prompt_id
        calls = [0]

        def hook(value_, total, preview, **kw):
            ctx = get_executing_context()
            if ctx is None or ctx.prompt_id != prompt_id:
                comfy.utils.set_progress_bar_global_hook(original)
            else:
                calls[0] += 1
                if calls[0] == at:
                    comfy.utils.set_progress_bar_global_hook(original)
                    comfy.model_management.interrupt_current_processing(True)
            return original(value_, total, preview, **kw)

        comfy.utils.set_progress_bar_global_hook(hook)
        return (value,)


NODE_CLASS_MAPPINGS = {"QwenPixTestInterruptAtProgress": QwenPixTestInterruptAtProgress}
