"""Write the example workflows: each graph once, as UI format and API format.

    python -m tools.make_workflows

Where they go (ComfyUI's custom-node template browser reads `example_workflows/*.json` and a same-name `.jpg`
thumbnail, and shows the file name as the card's title; ComfyUI 0.3.75's server also lists `workflows/*.json`,
so no UI file is kept there, which would show every example twice):
- `example_workflows/<title>.json` + `<title>.jpg`: the UI workflow under its human title (TITLES) and its card;
- `workflows/api/<name>.json`: its API-format twin under the stable snake-case name (the main job, the tests).

The graphs are described as data in `tools/workflows/` (one module per family, see its `__init__`); the node
specs (which inputs are widgets, their order, their defaults, the socket types: MODEL for the diffusion model,
the pack's own types for the text encoder and VAE) come from a running ComfyUI's /object_info, so the UI files
are what the frontend itself would save. Widgets a description leaves out (optional ones such as the loader's
`positions`) get the node's default in both formats, as the frontend sends them. The end-to-end tests check
that the frontend turns each UI file back into its API twin.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tools.comfy_harness import ComfyClient, ComfyServer
from tools.workflows import TITLES, graphs, models, title_of
from tools.workflows.build import (
    EXAMPLES,
    INPUTS,
    OUT,
    THUMB_SIZE,
    complete,
    to_api,
    to_ui,
    widget_default,
    write_example_images,
    write_thumbnail,
)

# what the tests use from here (the machinery lives in tools/workflows/build.py)
__all__ = [
    "EXAMPLES", "INPUTS", "OUT", "THUMB_SIZE", "TITLES",
    "complete", "main", "title_of", "to_api", "to_ui", "widget_default", "write_thumbnail",
]  # fmt: skip


def main() -> None:
    write_example_images()
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        info = ComfyClient(server.url).object_info()
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    EXAMPLES.mkdir(exist_ok=True)
    downloads = models()
    for name, (text, graph) in graphs().items():
        graph, title = complete(graph, info), title_of(name)
        (OUT / "api" / f"{name}.json").write_text(json.dumps(to_api(graph, info), indent=2) + "\n")
        (EXAMPLES / f"{title}.json").write_text(json.dumps(to_ui(graph, info, text, downloads), indent=2) + "\n")
        write_thumbnail(EXAMPLES / f"{title}.jpg", title, graph)
        print(f"wrote example_workflows/{title}.json (+ .jpg) and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
