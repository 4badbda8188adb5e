"""Sequence parallel (issue 20, 2): two gloo ranks (spawned worker processes, float32, a tiny DiT) give the
single-process forward for text-to-image, an edit with two references (Edit-2511's zero_cond_t) and batched
CFG rows of different prompt lengths, and the same 3-step sampling run; the workers stay up between jobs,
stop together on an interrupt, raise a rank's error with its traceback, and a worker killed mid-run is a
clear error within seconds, after which the next run starts fresh workers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from qwen_image_core.mmdit import load_dit
from qwen_image_core.offload_plan import split_blocks
from qwen_image_core.parallel import jobs
from qwen_image_core.parallel.ulysses import Shards
from qwen_image_core.parallel.workers import DitFile, WorkerDied, WorkerError, Workers
from qwen_image_core.pipeline import Conditioning, sample
from qwen_image_core.sampling import sigmas_comfy
from tools.checkpoints import dit as D

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-6  # float32: the bound (the differences are GEMMs of other row counts, a few ulps)
CFG = D.tiny_config(num_heads=4, zero_cond_t=True)  # 4 heads: 2 per rank


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return D.write_comfy(tmp_path_factory.mktemp("sp") / "dit.safetensors", CFG, dtype=torch.float32)


@pytest.fixture(scope="module")
def model(model_file):
    return load_dit(model_file)


@pytest.fixture(scope="module")
def workers(model_file):
    here = str(Path(__file__).parent)  # the workers import this module for `refuse_on_rank_1`
    with Workers(DitFile(str(model_file)), ["cpu", "cpu"], threads=1, timeout_s=30, paths=[here]) as w:
        yield w


def inputs(case: str):
    """(img, timestep, txt, keyword arguments) of a forward; odd token grids and lengths that do not split evenly."""
    g = torch.Generator().manual_seed(3)
    img, kw = torch.randn(2, 16, 10, 14, generator=g), {}  # 5 x 7 = 35 target tokens
    txt = torch.randn(2, 7, CFG.text_dim, generator=g)
    if case == "cfg_mask":  # cond and uncond of 7 and 4 tokens, padded, masked
        kw["txt_mask"] = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    elif case == "cfg_lengths":  # the same rows through per-row attention (no mask)
        kw["txt_lengths"] = [7, 4]
    elif case.startswith("edit"):  # two references of other sizes (one odd), Edit-2511's t = 0 modulation
        kw["ref_latents"] = [torch.randn(1, 16, 6, 8, generator=g), torch.randn(1, 16, 9, 5, generator=g)]
        kw["zero_cond_t"] = case == "edit_2511"
    return img, torch.tensor([0.7, 0.7]), txt, kw


def test_shards_cover_the_image_tokens_once():
    """Rank after rank, the shards hold the image tokens in order, then the last shard's padding."""
    for image, world in [(35, 2), (35, 4), (12, 3), (1, 2)]:
        held = torch.cat([Shards(image, world, r).image_index() for r in range(world)])
        assert torch.equal(held[:image], torch.arange(image)) and bool((held[image:] == image - 1).all())
        assert sum(Shards(image, world, r).targets(image // 3) for r in range(world)) == image // 3


@pytest.mark.parametrize("case", ["t2i", "cfg_mask", "cfg_lengths", "edit", "edit_2511"])
def test_forward_equals_single_process(workers, model, case):
    img, t, txt, kw = inputs(case)
    ref = model(img, t, txt, **kw)
    out = workers.run(jobs.forward, img, t, txt, **kw)
    diff = (out - ref).abs().max().item()
    print(f"{case}: max abs diff {diff:.2e} (|v| <= {ref.abs().max().item():.2f})")
    assert out.shape == ref.shape and diff <= TOL


def sampling_inputs():
    g = torch.Generator().manual_seed(5)
    ref = [torch.randn(1, 16, 6, 8, generator=g), torch.randn(1, 16, 8, 6, generator=g)]
    cond = Conditioning(torch.randn(1, 9, CFG.text_dim, generator=g), None, ref)
    uncond = Conditioning(torch.randn(1, 5, CFG.text_dim, generator=g), None, ref)
    return torch.randn(1, 16, 10, 14, generator=g), cond, uncond


def test_sampling_equals_single_process(workers, model):
    noise, cond, uncond = sampling_inputs()
    kw = dict(sigmas=sigmas_comfy(3, shift=3.1), cfg_scale=4.0)
    ref = sample(model, noise, cond, uncond, **kw)
    steps = []
    out = workers.run(jobs.sample, noise, cond, uncond, on_progress=lambda i, n: steps.append((i, n)), **kw)
    diff = (out - ref).abs().max().item()
    print(f"3-step edit sampling with CFG: max abs diff {diff:.2e} (|x| <= {ref.abs().max().item():.2f})")
    assert diff <= TOL and steps == [(1, 3), (2, 3), (3, 3)]


class Stop(Exception):
    pass


def raise_at_step_2(steps):
    def on_progress(i, n):  # as ComfyUI's progress hook raises its interrupt
        steps.append(i)
        if i == 2:
            raise Stop("interrupted from the progress hook")

    return on_progress


@pytest.mark.parametrize("where", ["check_interrupt", "on_progress"])
def test_interrupt_stops_every_rank_and_keeps_the_workers(workers, where):
    noise, cond, uncond = sampling_inputs()
    pids, steps = workers.pids, []

    def check():
        if steps:
            raise Stop("interrupted by the host")

    hooks = {"check_interrupt": check, "on_progress": lambda i, n: steps.append(i)}
    if where == "on_progress":
        hooks = {"on_progress": raise_at_step_2(steps)}
    with pytest.raises(Stop):
        workers.run(jobs.sample, noise, cond, uncond, sigmas=sigmas_comfy(200, shift=3.1), cfg_scale=4.0, **hooks)
    assert steps and steps[-1] < 200 and workers.pids == pids and workers.alive
    img, t, txt, kw = inputs("t2i")
    assert workers.run(jobs.forward, img, t, txt, **kw).shape == img.shape  # the same workers go on


def refuse_on_rank_1(ctx, img, t, txt):
    """A job whose rank 1 fails (the block-hook refusal) while rank 0 waits for it inside a collective."""
    if ctx.rank == 1:
        ctx.forward(img, t, txt, block_hook=lambda i, run, *a: run(*a))
    ctx.stop_requested()


def test_a_ranks_error_is_raised_with_its_traceback(workers):
    img, t, txt, _ = inputs("t2i")
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 failed in refuse_on_rank_1:\n(.|\n)*ValueError: .*block hooks"):
        workers.run(refuse_on_rank_1, img, t, txt)
    assert time.monotonic() - t0 < 10 and not workers.alive  # stopped: rank 0 was left inside a collective


def test_killed_worker_is_a_clear_error_then_a_fresh_start(workers):
    noise, cond, uncond = sampling_inputs()
    workers.start()
    victim = workers.pids[1]

    def kill(i, n):
        if i == 2:
            os.kill(victim, signal.SIGKILL)

    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=r"rank 1 \(pid \d+, cpu\) was killed by signal 9 during sample"):
        workers.run(jobs.sample, noise, cond, uncond, sigmas=sigmas_comfy(500, shift=3.1), on_progress=kill)
    print(f"killed worker reported after {time.monotonic() - t0:.1f} s")
    assert time.monotonic() - t0 < 20 and not workers.alive
    img, t, txt, kw = inputs("t2i")
    assert workers.run(jobs.forward, img, t, txt, **kw).shape == img.shape and victim not in workers.pids


def test_workers_stream_what_their_budget_does_not_hold(tmp_path):
    """Each rank holds the DiT's streaming plan within a device budget (the offload executor, CPU accounting):
    the same numbers, blocks streamed, the device bytes never above the budget."""
    cfg = D.tiny_config(num_heads=4, num_layers=4, zero_cond_t=True)
    path = D.write_comfy(tmp_path / "dit4.safetensors", cfg, dtype=torch.float32)
    model = load_dit(path)
    sizes, fixed = split_blocks(model, model.transformer_blocks)
    budget = fixed + 3 * max(sizes)  # one block resident, three streamed through two staging buffers
    img, t, txt, kw = inputs("edit_2511")
    ref = model(img, t, txt, **kw)
    with Workers(DitFile(str(path), budget=budget), ["cpu", "cpu"], threads=1, timeout_s=30) as w:
        out = w.run(jobs.forward, img, t, txt, **kw)
        where = w.run(jobs.placement)
    print(f"streamed blocks {where['streamed']}, peak {where['peak']} of {budget} bytes")
    assert torch.equal(out, ref) and where["streamed"] and where["peak"] <= budget
