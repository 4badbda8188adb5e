"""LoRA variants in the core (headless): every key spelling, LyCORIS LoKr / LoHa, DoRA, diff / diff_b deltas and
`.alpha` as [] or [1] give the effective weights (and biases, norm scales) of ComfyUI's own loader
(`comfy.lora.load_lora` with its QwenImage key map, then `calculate_weight`) and, for the spellings diffusers
reads, of diffusers' fused LoRA; strict refusals name the keys and what was tried; lenient reading skips them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracles import diffusers_fused
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.lora import effective_weight, load_lora, loras_applied
from qwen_image_core.mmdit import load_dit
from qwen_image_core.ops import cast_weight
from tools.checkpoints import dit as W
from tools.checkpoints import lora as L
from tools.comfy_paths import import_comfy_for_oracle

import_comfy_for_oracle()

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_base  # noqa: E402

TOL = 1e-6
DIFFUSERS_READS = ("peft", "kohya", "lightx2v", "ai_toolkit", "diffsynth", "bare")


class _KeyModel(comfy.model_base.QwenImage):
    """Just enough of ComfyUI's QwenImage model for its LoRA key map: the state-dict keys."""

    def __init__(self, sd):
        torch.nn.Module.__init__(self)
        self._sd, self.model_config = sd, SimpleNamespace(unet_config={})

    def state_dict(self, *args, **kwargs):
        return self._sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    cfg = W.tiny_config()
    return cfg, load_dit(W.write_comfy(tmp_path_factory.mktemp("dit") / "tiny.safetensors", cfg, dtype=torch.float32))


def _tensor(module, attr: str) -> torch.Tensor:
    """The float32 tensor a layer computes with (weight with its LoRAs and patches, or bias, or norm scale)."""
    if attr == "weight" and hasattr(module, "compute_weight"):
        return effective_weight(module)
    return cast_weight(getattr(module, attr), None, torch.float32, (), getattr(module, f"{attr}_fns"))


def comfy_result(model, paths_strengths):
    """{state-dict key: float32 tensor} for every tensor ComfyUI's loader patches, patches chained in order."""
    base = {f"diffusion_model.{k}": v for k, v in model.state_dict().items()}
    key_map = comfy.lora.model_lora_keys_unet(_KeyModel(base), {})
    chain: dict[str, list] = {}
    for path, strength in paths_strengths:
        sd = comfy.lora_convert.convert_lora(load_file(str(path)))
        for key, patch in comfy.lora.load_lora(sd, key_map, log_missing=False).items():
            chain.setdefault(key, []).append((strength, patch, 1.0, None, None))
    return {key: comfy.lora.calculate_weight(p, base[key].float().clone(), key) for key, p in chain.items()}


def ours(model, loras):
    """The same tensors from QwenPix: each file read (strictly) and applied at the cast."""
    mods = dict(model.named_modules())
    with loras_applied(model, [(load_lora(path, model), s) for path, s in loras]):
        return {f"diffusion_model.{n}.{a}": _tensor(mods[n], a) for n, a in _patched(model)}


def _patched(model):
    for name, m in model.named_modules():
        if getattr(m, "lora", ()) or getattr(m, "weight_fns", ()):
            yield name, "weight"
        if getattr(m, "bias_fns", ()):
            yield name, "bias"


def assert_equal_to_comfy(model, loras) -> float:
    ref, got = comfy_result(model, loras), ours(model, loras)
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    base = dict(model.state_dict())
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= TOL, worst
    assert all(float((ref[k] - base[k.removeprefix("diffusion_model.")].float()).abs().max()) > 1e-4 for k in ref)
    return worst


@pytest.mark.parametrize("spelling", list(L.SPELLINGS))
def test_every_spelling_equals_comfyuis_loader(tiny, tmp_path, spelling):
    cfg, model = tiny
    alpha = None if spelling == "peft" else 8.0  # ComfyUI ignores PEFT's metadata alpha; `.alpha` it reads
    path = L.write_lora(tmp_path / "l.safetensors", cfg, spelling, alpha=alpha, alpha_shape=(1,), seed=3)
    assert_equal_to_comfy(model, [(path, 0.7)])


def test_spellings_mixed_in_one_file_and_scalar_or_one_element_alphas(tiny, tmp_path):
    cfg, model = tiny
    path = L.write_lora(tmp_path / "mixed.safetensors", cfg, tuple(s for s in L.SPELLINGS if s != "peft"))
    one = L.write_lora(tmp_path / "one.safetensors", cfg, "kohya", alpha=6.0, alpha_shape=(1,), seed=4)
    assert_equal_to_comfy(model, [(path, 0.8), (one, -0.4)])


@pytest.mark.parametrize("spelling", DIFFUSERS_READS)
def test_spellings_diffusers_reads_equal_its_fused_weights(tiny, tmp_path, spelling):
    cfg, model = tiny
    path = L.write_lora(tmp_path / f"{spelling}.safetensors", cfg, spelling, alpha=8.0, seed=5)
    ref = diffusers_fused(cfg, path, 0.7)
    layers = dict(model.named_modules())
    with loras_applied(model, [(load_lora(path, model), 0.7)]):
        for name, want in ref.items():
            assert float((effective_weight(layers[name]) - want).abs().max()) <= TOL, name


@pytest.mark.parametrize("form", L.LOKR_FORMS)
def test_lokr_equals_comfyuis_adapter(tiny, tmp_path, form):
    cfg, model = tiny
    path = L.write_lycoris(tmp_path / "lokr.safetensors", cfg, "lokr", form=form, alpha=6.0)
    assert_equal_to_comfy(model, [(path, 0.7)])


def test_loha_equals_comfyuis_adapter(tiny, tmp_path):
    cfg, model = tiny
    assert_equal_to_comfy(model, [(L.write_lycoris(tmp_path / "loha.safetensors", cfg, "loha", spelling="kohya"), 0.9)])


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_equals_comfyuis_weight_decomposition(tiny, tmp_path, kind, axis, strength):
    cfg, model = tiny
    if kind == "lora":
        path = L.write_lora(tmp_path / "d.safetensors", cfg, "kohya", dora=axis, seed=6)
    else:
        path = L.write_lycoris(tmp_path / "d.safetensors", cfg, kind, dora=axis, seed=6)
    assert_equal_to_comfy(model, [(path, strength)])


@pytest.mark.parametrize("ending", [".diff", ".w_norm"])
def test_full_weight_bias_and_norm_deltas_equal_comfyuis(tiny, tmp_path, ending):
    cfg, model = tiny
    path = L.write_diff(tmp_path / "diff.safetensors", cfg, spelling="bare", norm_ending=ending)
    assert_equal_to_comfy(model, [(path, 0.5)])


def test_a_file_with_every_kind_equals_comfyuis(tiny, tmp_path):
    cfg, model = tiny
    assert_equal_to_comfy(model, [(L.write_every_kind(tmp_path / "every.safetensors", cfg), 0.8)])


def test_kinds_stack_in_order_like_comfyuis_chain(tiny, tmp_path):
    """A plain LoRA, a DoRA and a LoKr on the same layers: applied one after the other, as ComfyUI chains them."""
    cfg, model = tiny
    plain = L.write_lora(tmp_path / "a.safetensors", cfg, "lightx2v", seed=1)
    dora = L.write_lora(tmp_path / "b.safetensors", cfg, "peft_default", dora="in", seed=2)
    lokr = L.write_lycoris(tmp_path / "c.safetensors", cfg, "lokr", seed=3)
    diff = L.write_diff(tmp_path / "d.safetensors", cfg)
    assert_equal_to_comfy(model, [(plain, 0.8), (dora, 0.5), (lokr, -0.3), (diff, 1.0)])


def test_on_fp8_base_exact_and_base_restored(tmp_path, one_thread):
    cfg = W.tiny_config()
    model = load_dit(W.write_scaled_fp8(tmp_path / "fp8.safetensors", cfg))
    layer = model.transformer_blocks[1].img_mlp.net[0].proj
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lokr = L.write_lycoris(tmp_path / "k.safetensors", cfg, "lokr", dora="out")
    with loras_applied(model, [(load_lora(lokr, model), 0.7)]):
        w = effective_weight(layer)
        assert layer.weight.dtype == torch.float8_e4m3fn  # stored fp8, never re-quantised
    ref = comfy.lora.calculate_weight(
        [(0.7, comfy.lora.load_lora(load_file(str(lokr)), {"lycoris_transformer_blocks_1_img_mlp_net_0_proj": "k"},
                                    log_missing=False)["k"], 1.0, None, None)],
        layer.weight.float() * layer.weight_scale.float(), "k")  # fmt: skip
    assert float((w - ref).abs().max()) <= TOL
    assert layer.weight_fns == () and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_forward_with_kinds_equals_fused_model(tiny, tmp_path):
    cfg, model = tiny
    loras = [(load_lora(L.write_lycoris(tmp_path / "k.safetensors", cfg, "lokr", dora="out"), model), 0.8),
             (load_lora(L.write_diff(tmp_path / "d.safetensors", cfg), model), 1.0)]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    img, sigma, txt = (
        torch.randn(1, 16, 8, 8, generator=g),
        torch.tensor([0.6]),
        torch.randn(1, 5, cfg.text_dim, generator=g),
    )
    with torch.no_grad(), loras_applied(model, loras):
        patched = model(img, sigma, txt)
        fused = {f"{n}.{a}": _tensor(m, a) for n, a in _patched(model) for m in [dict(model.named_modules())[n]]}
    ref = load_dit(model.path)
    ref.load_state_dict({**ref.state_dict(), **fused})
    with torch.no_grad():
        assert torch.allclose(patched, ref(img, sigma, txt), atol=1e-5, rtol=1e-5)


# -- strict by default, lenient on request
def _with(path, extra: dict, out) -> str:
    sd = {**load_file(str(path)), **extra}
    save_file(sd, str(out))
    return out


@pytest.fixture
def good(tiny, tmp_path):
    cfg, model = tiny
    return model, L.write_lora(tmp_path / "good.safetensors", cfg, "ai_toolkit", seed=7)


BAD = {
    "diffusion_model.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 96),  # no block 7
    "lora_unet_transformer_blocks_0_attn_to_qq.lora_down.weight": torch.zeros(4, 96),  # a typo
    "diffusion_model.img_in.lora_mid.weight": torch.zeros(4, 4),  # LoCon middle factor
    "diffusion_model.txt_in.lora_A.weight": torch.zeros(4, 40),  # no lora_B
    "diffusion_model.transformer_blocks.0.something_else": torch.zeros(2),  # not a LoRA tensor
}


def test_strict_refusal_lists_each_key_and_what_was_tried(good, tmp_path):
    model, path = good
    bad = _with(path, BAD, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_lora(bad, model)
    msg = str(info.value)
    for fragment in (
        f"5 of {len(load_file(str(bad)))} keys of this LoRA cannot be applied",
        "read it leniently",
        "transformer_blocks.7.attn.to_q.lora_A.weight: no layer 'transformer_blocks.7.attn.to_q' after "
        "'diffusion_model.'",
        "no layer 'transformer_blocks_0_attn_to_qq' after 'lora_unet_' (dots written as '_'); nearest: "
        "transformer_blocks.0.attn.to_q",
        "is of a kind QwenPix does not apply",
        "LoCon/Tucker middle factor",
        "does not make a whole patch",
        "txt_in's lora patch has down, needs down+up",
        "is not a LoRA tensor of a kind QwenPix reads",
        "transformer_blocks.0.something_else",
        "expected <prefix><layer><ending>",
    ):
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"


def test_lenient_applies_the_rest_and_reports_the_skipped_keys(good, tmp_path):
    model, path = good
    bad = _with(path, BAD, tmp_path / "bad.safetensors")
    lenient, strict = load_lora(bad, model, lenient=True), load_lora(path, model)
    assert sorted(k for k, _ in lenient.skipped) == sorted(BAD)
    assert lenient.modules == strict.modules and strict.skipped == ()
    assert comfy_result(model, [(bad, 0.7)]).keys() == comfy_result(model, [(path, 0.7)]).keys()  # ComfyUI skips them
    assert_equal_to_comfy(model, [(path, 0.7)])


def test_nothing_applies_is_an_error_even_lenient(tiny, tmp_path):
    cfg, model = tiny
    wide = L.write_lora(tmp_path / "wide.safetensors", W.tiny_config(num_heads=4), "kohya")
    for lenient in (False, True):
        with pytest.raises(CheckpointError, match="made for another model"):
            load_lora(wide, model, lenient=lenient)
    save_file({"unet.down.0.lora_down.weight": torch.zeros(2, 3)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="is not a LoRA for this Qwen-Image DiT"):
        load_lora(tmp_path / "sdxl.safetensors", model, lenient=True)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"lycoris_img_in.lokr_w1": torch.zeros(2, 2)}, "lokr patch has w1, needs"),
        (
            {
                "img_in.lora_A.weight": torch.zeros(4, 64),
                "img_in.lora_B.weight": torch.zeros(96, 4),
                "img_in.diff": torch.zeros(96, 64),
            },
            "patches of two kinds (diff, lora)",
        ),  # fmt: skip
        ({"img_in.alpha": torch.tensor(4.0)}, "alpha for img_in without any factors"),
        ({"img_in.diff": torch.zeros(96, 64), "img_in.dora_scale": torch.ones(96, 1)}, "dora_scale but no low-rank"),
        (
            {
                "img_in.lora_A.weight": torch.zeros(4, 64),
                "img_in.lora_B.weight": torch.zeros(96, 4),
                "img_in.dora_scale": torch.ones(96),
            },
            "dora_scale of shape [96]; for this layer it is [96, 1] or [1, 64]",
        ),  # fmt: skip
        ({"txt_norm.diff_b": torch.zeros(40)}, "changes a bias, the layer has none"),
        ({"img_in.diff": torch.zeros(64, 96)}, "is 64x96, the layer is 96x64"),
        ({"img_in.lokr_w1": torch.zeros(2, 2), "img_in.lokr_w2": torch.zeros(48, 16)}, "is 96x32, the layer is 96x64"),
        (
            {
                "img_in.hada_w1_a": torch.zeros(96, 2),
                "img_in.hada_w1_b": torch.zeros(3, 64),
                "img_in.hada_w2_a": torch.zeros(96, 2),
                "img_in.hada_w2_b": torch.zeros(2, 64),
            },
            "disagree on the rank",
        ),  # fmt: skip
        ({"img_in.diff": torch.full((96, 64), float("nan"))}, "img_in.diff holds non-finite values"),
    ],
    ids=[
        "lokr_half",
        "ambiguous",
        "alpha_only",
        "dora_on_diff",
        "dora_shape",
        "bias_none",
        "diff_shape",
        "lokr_shape",
        "loha_rank",
        "nan_diff",
    ],  # fmt: skip
)
def test_unusable_layers_are_named(tiny, tmp_path, extra, fragment):
    cfg, model = tiny
    one = L.write_lora(tmp_path / "one.safetensors", cfg, "kohya", modules=[("proj_out", (64, 96))])
    path = _with(one, extra, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_lora(path, model)
    assert fragment in str(info.value), str(info.value)
    if "non-finite" not in fragment and "rank" not in fragment:  # damage stays an error when lenient
        assert load_lora(path, model, lenient=True).modules == ["proj_out"]
