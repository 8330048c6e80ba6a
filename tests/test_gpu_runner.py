"""The runner on a CUDA device: the "sale" attention reaches the CUDA kernel inside a real model."""

import pytest
import torch
from conftest import random_ids, save_tiny_model

from sale_cli.options import SaleOptions
from sale_cli.runner import load_runner

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _save_tiny_llama(path, layers: int):
    """A random Llama (4 heads, 2 kv heads, d 64) with peaked attention, and its tokenizer, saved to ``path``."""
    return save_tiny_model(path, "The quick brown fox jumps over the lazy dog. 0123456789\n" * 50, vocab_size=300,
                           hidden_size=256, intermediate_size=512, layers=layers, max_positions=8192, sharpen=6.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_tiny_llama(tmp_path_factory.mktemp("gpu_llama"), layers=2)


def test_sale_on_cuda_uses_the_kernel_and_matches_dense_at_tau_zero(model_dir):
    from transformers import AutoModelForCausalLM

    runner = load_runner(str(model_dir), dtype="bfloat16", device="cuda", options=SaleOptions(dense_below=0))
    assert runner.sale_backend == "cuda", runner.sale_backend
    assert runner.dense_backend.startswith("sdpa:")
    ids = random_ids(3000, runner.model.config.vocab_size, seed=0)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    with torch.no_grad():
        want = plain(ids.cuda()).logits[0, -1].float().cpu()
    dense = runner.prefill(ids)
    assert (dense.logits_last - want).abs().max() < 0.1
    runner.set_method("sale", torch.zeros(2, 4))
    zero = runner.prefill(ids)
    assert (zero.logits_last - dense.logits_last).abs().max() < 0.1 and zero.density == pytest.approx(1.0)
    runner.set_method("sale", torch.full((2, 4), 0.3))
    with runner.stage_timings():
        sparse = runner.prefill(ids)
    assert 0 < sparse.density < 1 and sparse.attn_ms > 0
    assert set(sparse.timings) == {"quant", "select", "compute"}
    gen = runner.generate(ids[0].tolist(), max_new_tokens=4)
    assert gen.input_tokens == 3000 and gen.new_tokens >= 1


def test_calibration_on_cuda(model_dir, tmp_path):
    from sale_cli.calibrate import calibrate

    runner = load_runner(str(model_dir), dtype="bfloat16", device="cuda", options=SaleOptions(dense_below=0))
    kw = dict(samples=1, tokens=2500, tau0=0.64, progress=False)
    tau, density = calibrate(runner, 0.5, out=tmp_path / "t.safetensors", dense_above=1.0, **kw)
    assert tau.shape == (2, 4) and (tau >= 0).all() and ((density > 0) & (density <= 1)).all()
    assert (tau > 0).any()
    # by default heads above this GPU's break-even density go dense, and the file says which rule applied
    from sale_cli import thresholds
    from sale_cli.break_even import default_dense_above

    ruled, _ = calibrate(runner, 0.5, out=tmp_path / "r.safetensors", **kw)
    value, source = default_dense_above(runner.device, 2500)
    _, meta = thresholds.load(tmp_path / "r.safetensors")
    assert meta["dense_above"] == f"{value:g}" and meta["dense_above_source"] == source and value < 1
    expect = tau.clone()
    expect[(density > value) & (tau > 0)] = 0
    assert torch.equal(ruled, expect)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_map_auto_spreads_layers_and_matches_one_gpu(tmp_path):
    path = _save_tiny_llama(tmp_path, layers=6)  # enough layers for accelerate's balanced map to use both GPUs
    opts = SaleOptions(dense_below=0)
    one = load_runner(str(path), dtype="bfloat16", device="cuda", options=opts)
    spread = load_runner(str(path), dtype="bfloat16", device_map="auto", options=opts)
    assert {0, 1} <= {torch.device(d).index for d in spread.model.hf_device_map.values()}, spread.model.hf_device_map
    assert spread.sale_backend == "cuda"
    ids = random_ids(3000, one.model.config.vocab_size, seed=1)
    results = []
    for runner in (one, spread):
        runner.set_method("sale", torch.full((6, 4), 0.3))
        with runner.stage_timings():
            results.append(runner.prefill(ids))
    a, b = results
    assert 0 < b.density < 1 and b.density == pytest.approx(a.density)
    assert (b.logits_last - a.logits_last).abs().max() < 0.05
    assert b.attn_ms > 0 and set(b.timings) == {"quant", "select", "compute"} and min(b.timings.values()) > 0
