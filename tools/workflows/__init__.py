"""The example workflows, one module per family, written by one command:

    python -m tools.make_workflows

- `build.py`: the format machinery (a graph described as data -> UI file, API twin, defaults, thumbnails);
- `qwen_image.py`: the v1 examples (text to image, Lightning, the edit models, native KSampler);
- `layered.py`: Qwen-Image-Layered (issue 16);
- `control.py`: ControlNet Union, Inpainting ControlNet, masked edit with crop and stitch (issue 15);
- `qwen21.py`: Qwen-Image-2.1 (issue 17): text to image, edit with 3 references, Turbo, background removal.

Each family module exposes `TITLES` (name -> the template card's title), `SOURCES` (model file -> (models
sub-folder, where it is published)) and `graphs()` (name -> (note text, graph)). To add a family: a module with
those three and one entry in FAMILIES.
"""

from __future__ import annotations

from tools.workflows import control, layered, qwen21, qwen_image

FAMILIES = (
    qwen_image,
    layered,
    control,
    qwen21,
)
TITLES = {name: title for family in FAMILIES for name, title in family.TITLES.items()}


def title_of(name: str) -> str:
    """The example's title: the UI file's name, which the template browser shows on its card."""
    return TITLES.get(name) or name.replace("_", " ").title()


def models() -> dict[str, tuple[str, str]]:
    """Every family's model file -> (models sub-folder, download URL); a file named twice must agree."""
    out: dict[str, tuple[str, str]] = {}
    for family in FAMILIES:
        for name, (folder, base) in family.SOURCES.items():
            entry = (folder, f"{base}/{name}")
            assert out.setdefault(name, entry) == entry, f"{name}: {out[name]} vs {entry} ({family.__name__})"
    return out


def graphs() -> dict[str, tuple[str, dict]]:
    """name -> (note text, graph) of every example, family by family; a name must be unique."""
    out: dict[str, tuple[str, dict]] = {}
    for family in FAMILIES:
        for name, entry in family.graphs().items():
            assert name not in out, f"example {name} defined twice ({family.__name__})"
            out[name] = entry
    return out
