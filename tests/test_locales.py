"""The pack's translations against its registered nodes, in-process (ComfyUI's modules imported, no server).

locales/en and locales/zh (nodeDefs.json) name every registered node, each of its inputs (label and tooltip) and
each of its outputs (tooltip); the English entries carry the node classes' own texts (so the English UI never
shows a stale tooltip), the Chinese ones are Chinese; no entry names a node or input that no longer exists; every
node with an English help page (web/docs/<NodeId>.md or web/docs/<NodeId>/en.md) has a Chinese one (zh.md).

After changing a node's texts: `.venv/bin/python tests/test_locales.py --write-en` rewrites the English entries
from the node classes (labels kept), then translate the new or changed entries in locales/zh by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"
DOCS = ROOT / "web" / "docs"
LANGS = ("en", "zh")
CJK = re.compile(r"[\u4e00-\u9fff]")  # at least one Chinese character: the text was translated


def _nodes():
    """{node id: node class} as ComfyUI registers them (the pack imported as the package `qwenpix`)."""
    from tools.comfy_paths import import_comfy_for_oracle, import_pack  # noqa: PLC0415

    import_comfy_for_oracle()
    return import_pack(register_nodes=True).NODE_CLASS_MAPPINGS


def _inputs(cls) -> dict[str, str | None]:
    """{input name: tooltip} of a node class, required then optional (INPUT_TYPES order)."""
    types = cls.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, spec in types.get(group, {}).items():
            out[name] = (spec[1] if len(spec) > 1 else {}).get("tooltip")
    return out


def _outputs(cls) -> dict[str, tuple[str, str | None]]:
    """{output index as a string: (name, tooltip)} of a node class."""
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    tips = list(getattr(cls, "OUTPUT_TOOLTIPS", None) or ())
    return {str(i): (names[i], tips[i] if i < len(tips) else None) for i in range(len(cls.RETURN_TYPES))}


def english(cls, previous: dict) -> dict:
    """The English entry of a node class: its own texts; input labels kept from `previous` (else the input id)."""
    entry = {"display_name": cls.DISPLAY_NAME}
    if getattr(cls, "DESCRIPTION", None):
        entry["description"] = cls.DESCRIPTION
    labels = previous.get("inputs", {})
    entry["inputs"] = {
        name: {"name": labels.get(name, {}).get("name", name), "tooltip": tip} for name, tip in _inputs(cls).items()
    }
    entry["outputs"] = {i: {"name": name, "tooltip": tip} for i, (name, tip) in _outputs(cls).items()}
    return entry


def _load(lang: str, kind: str) -> dict:
    return json.loads((LOCALES / lang / f"{kind}.json").read_text(encoding="utf-8"))


def _help_pages(node_id: str) -> dict[str, Path]:
    """{language: help page} of a node, as ComfyUI's frontend looks for them."""
    pages = {}
    for lang, path in (
        ("en", DOCS / f"{node_id}.md"),
        ("en", DOCS / node_id / "en.md"),
        ("zh", DOCS / node_id / "zh.md"),
    ):
        if path.is_file():
            pages.setdefault(lang, path)
    return pages


def test_every_node_input_and_output_has_an_entry_in_each_language():
    nodes = _nodes()
    missing = []
    for lang in LANGS:
        defs = _load(lang, "nodeDefs")
        for node_id, cls in nodes.items():
            entry = defs.get(node_id)
            if entry is None:
                missing.append(f"{lang}: node {node_id}")
                continue
            if not entry.get("display_name"):
                missing.append(f"{lang}: {node_id} display_name")
            if getattr(cls, "DESCRIPTION", None) and not entry.get("description"):
                missing.append(f"{lang}: {node_id} description")
            for name in _inputs(cls):
                got = entry.get("inputs", {}).get(name, {})
                missing += [f"{lang}: {node_id}.{name} {k}" for k in ("name", "tooltip") if not got.get(k)]
            for i in _outputs(cls):
                if not entry.get("outputs", {}).get(i, {}).get("tooltip"):
                    missing.append(f"{lang}: {node_id} output {i} tooltip")
    assert not missing, "no locale entry for:\n" + "\n".join(missing)


def test_no_entry_for_a_node_or_input_that_does_not_exist():
    nodes = _nodes()
    stale = []
    for lang in LANGS:
        for node_id, entry in _load(lang, "nodeDefs").items():
            if node_id not in nodes:
                stale.append(f"{lang}: node {node_id}")
                continue
            inputs, outputs = _inputs(nodes[node_id]), _outputs(nodes[node_id])
            stale += [f"{lang}: {node_id}.{n}" for n in entry.get("inputs", {}) if n not in inputs]
            stale += [f"{lang}: {node_id} output {i}" for i in entry.get("outputs", {}) if i not in outputs]
    assert not stale, "locale entries for nothing registered:\n" + "\n".join(stale)


def test_english_entries_are_the_node_classes_own_texts():
    nodes = _nodes()
    en = _load("en", "nodeDefs")
    for node_id, cls in nodes.items():
        assert en.get(node_id) == english(cls, en.get(node_id, {})), (
            f"locales/en/nodeDefs.json {node_id} differs from the node class: run "
            "`.venv/bin/python tests/test_locales.py --write-en`, then update locales/zh"
        )


def test_chinese_entries_are_translated():
    untranslated = []
    for node_id, entry in _load("zh", "nodeDefs").items():
        texts = {"display_name": entry.get("display_name", ""), "description": entry.get("description", "中")}
        texts |= {f"{n}.tooltip": v.get("tooltip", "") for n, v in entry.get("inputs", {}).items()}
        texts |= {f"output {i}.tooltip": v.get("tooltip", "") for i, v in entry.get("outputs", {}).items()}
        untranslated += [f"{node_id} {k}: {v!r}" for k, v in texts.items() if not CJK.search(v)]
    assert not untranslated, "not Chinese:\n" + "\n".join(untranslated)


def test_main_json_has_the_same_keys_in_each_language():
    def keys(d, prefix=""):
        return {
            k for key, v in d.items() for k in (keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])
        }

    en, zh = (keys(_load(lang, "main")) for lang in LANGS)
    assert en == zh and en


def test_every_node_has_help_pages_in_english_and_chinese():
    missing = []
    for node_id in _nodes():
        pages = _help_pages(node_id)
        missing += [f"{node_id} {lang}" for lang in LANGS if lang not in pages]
        zh = pages.get("zh")
        if zh and not (zh.read_text(encoding="utf-8").startswith("# ") and CJK.search(zh.read_text(encoding="utf-8"))):
            missing.append(f"{node_id} zh (not a Chinese page starting with a '# ' title)")
    assert not missing, "no help page:\n" + "\n".join(missing)


def _write_english():
    nodes = _nodes()
    path = LOCALES / "en" / "nodeDefs.json"
    previous = json.loads(path.read_text(encoding="utf-8"))
    entries = {node_id: english(cls, previous.get(node_id, {})) for node_id, cls in nodes.items()}
    path.write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}: {len(entries)} nodes")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-en"]:
        sys.exit("usage: tests/test_locales.py --write-en")
    _write_english()
