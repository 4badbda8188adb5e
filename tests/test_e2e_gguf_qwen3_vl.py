"""A Qwen3-VL GGUF encoder through the real server (Qwen-Image-2.1): llama.cpp's files in models/text_encoders (the
language model Q8_0 and its mmproj F16 beside it, named after it) are listed by the 2.1 text encoder loader (the
mmproj is not: it is found next to its model), load packed (the node shows both files' formats), and an edit
with a picture through 2.1 Encode -> Sampler -> Decode gives the same image as the float32 safetensors twin of
gguf's own dequantised weights; the language model alone (no mmproj next to it) says which file to add."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import save_file
from test_e2e_qwen21 import REFS, graph, write_models21

from graphs import fails
from tools.checkpoints import qwen3_vl as WQ
from tools.checkpoints import qwen3_vl_gguf as T

pytestmark = pytest.mark.e2e
NAMES = (
    "qp_q3g_dit.safetensors",
    "qp_q3g_v1_dit.safetensors",
    "qp_q3g_unused_te.safetensors",
    "qp_q3g_vae.safetensors",
)
GGUF, MMPROJ = "qp_q3g_te-Q8_0.gguf", "qp_q3g_te-mmproj-F16.gguf"
TWIN, SOLO = "qp_q3g_te_twin_f32.safetensors", "qp_q3g_solo/qp_q3g_solo-Q8_0.gguf"
PROMPT = "make <image1> blue"


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    write_models21(comfy.models_dir, tmp_path_factory.mktemp("q3g_e2e"), names=NAMES)
    ref, folder = WQ.reference_model(seed=0), comfy.models_dir / "text_encoders"
    text, mmproj = T.write_text(folder / GGUF, ref, "Q8_0"), T.write_mmproj(folder / MMPROJ, ref, "F16")
    twin = {k: v.contiguous() for k, v in T.reference_weights(text, mmproj, ref).items()}
    save_file(twin, str(folder / TWIN), metadata={"config": json.dumps({"text_encoder": ref.config.to_dict()})})
    (folder / SOLO).parent.mkdir(exist_ok=True)
    (folder / SOLO).write_bytes(text.read_bytes())
    return comfy


def edit(te: str) -> dict:
    g = graph(PROMPT, REFS[:1], dit=NAMES[0])
    g["te"]["inputs"]["text_encoder_name"] = te
    g["vae"]["inputs"]["vae_name"] = NAMES[3]
    return g


def run(server, client, te: str):
    res = client.run(edit(te), timeout=300)
    assert res.status == "success", (res.error() or {}).get("exception_message")
    plans = [e["data"]["output"]["qwenpix_plan"][0] for e in res.events
             if e["type"] == "executed" and e["data"]["node"] == "te"]  # fmt: skip
    return np.load(server.output_dir / "qwen21_image.npy"), plans


def test_a_gguf_pair_loads_through_the_21_loader_and_edits_as_its_float32_safetensors_twin(server, client):
    listed = client.object_info()["QwenPix21TextEncoderLoader"]["input"]["required"]["text_encoder_name"][0]
    assert GGUF in listed and TWIN in listed and MMPROJ not in listed
    image, plans = run(server, client, GGUF)
    assert plans and plans[0].startswith("GGUF Q8_0 (") and f"; vision tower {MMPROJ}: GGUF F16 (" in plans[0]
    twin, _ = run(server, client, TWIN)
    diff = float(np.abs(image - twin).max())
    print(
        f"\nQwen3-VL GGUF pair vs its float32 safetensors twin, edit through 2.1 Encode/Sampler/Decode: max {diff:.3g}"
    )
    assert image.shape == twin.shape and np.isfinite(image).all() and diff <= 1e-5


def test_without_its_mmproj_an_edit_says_which_file_to_add(server, client):
    fails(client, edit(SOLO), "enc", "no vision tower (no *mmproj*.gguf file lies next to it)",
          "put the Qwen3-VL-8B mmproj GGUF", "qp_q3g_solo-mmproj-F16.gguf")  # fmt: skip


def test_a_qwen25_gguf_in_the_21_loader_names_the_v1_loader(server, client):
    from tools.checkpoints import qwen_vl as W1  # noqa: PLC0415
    from tools.checkpoints import qwen_vl_gguf as T1  # noqa: PLC0415

    name = "qp_q3g_v1/Qwen2.5-VL-7B-Instruct-F16.gguf"
    T1.write_text(server.models_dir / "text_encoders" / name, W1.reference_model(seed=0), "F16", lm_head=False)
    fails(client, edit(name), "te", "Qwen2.5-VL language model of Qwen-Image v1", "'Load Qwen-Image Text Encoder'")


def test_a_changed_mmproj_reloads_the_encoder(server, client):
    """The mmproj is part of the loader's file identity: replacing it runs the loader again with the new tower."""
    before, _ = run(server, client, GGUF)
    path = server.models_dir / "text_encoders" / MMPROJ
    T.write_mmproj(path, WQ.reference_model(seed=1), "F16")
    after, plans = run(server, client, GGUF)
    assert plans, "the loader did not run again"  # it reports its plan each time it runs
    assert float(np.abs(after - before).max()) > 1e-3
