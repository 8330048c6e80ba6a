"""Chunked prefill (Lq < Lk per call) in the runner: same answers as the whole prompt, records, calibration, the
--prefill-chunk option, and the bottom-right mask of the runner's dense paths."""

import logging
import math

import pytest
import torch
from conftest import cpu_runner, random_ids, save_tiny_model

from sale_cli import thresholds as thresholds_io
from sale_cli.calibrate import calibrate
from sale_cli.kernels import sale_attention
from sale_cli.options import SaleOptions
from sale_cli.runner import check_prefill_chunk, default_prefill_chunk, load_runner, resolve_prefill_chunk

TEXT = ("The quick brown fox jumps over the lazy dog. {\"k9\": \"v7\"} Extract the value of the key. 0123456789\n"
        * 30)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_dir(request, tmp_path_factory):
    """A random 2-layer model (4 query heads, 2 kv heads) with sharpened attention, and its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp(request.param), TEXT, arch=request.param)


@pytest.mark.parametrize("method", ["dense", "sale"])
def test_chunked_prefill_equals_the_whole_prompt(tiny_dir, method):
    # estimate 'none': the chunks' block maps are the whole call's rows (softmax is shift-invariant), so the
    # logits and the aggregated density must agree to fp tolerance
    runner = cpu_runner(tiny_dir, options=SaleOptions(dense_below=0, estimate="none"), prefill_chunk=0)
    if method == "sale":
        runner.set_method("sale", torch.full((2, 4), 0.2))
    ids = random_ids(700, runner.model.config.vocab_size, seed=1)
    whole = runner.prefill(ids)
    calls = []
    runner.set_prefill_chunk(192)
    with runner.capture(lambda layer, q, k, v, out, scale: calls.append((layer, q.shape[2], k.shape[2]))):
        chunked = runner.prefill(ids)
    assert torch.allclose(chunked.logits_last, whole.logits_last, atol=1e-4), \
        (chunked.logits_last - whole.logits_last).abs().max()
    assert chunked.density == pytest.approx(whole.density, abs=1e-6)
    assert torch.allclose(torch.tensor(chunked.density_per_layer), torch.tensor(whole.density_per_layer), atol=1e-6)
    if method == "sale":
        assert whole.density < 1
    else:  # the calibration hook sees each chunk's call: Lq = the chunk's rows over every position so far
        bounds = [(0, 192), (192, 384), (384, 576), (576, 700)]
        assert calls == [(layer, b - a, b) for a, b in bounds for layer in (0, 1)]
    assert chunked.attn_ms > 0 and chunked.prefill_ms >= chunked.attn_ms


@pytest.mark.parametrize("method", ["dense", "sale"])
def test_greedy_answers_equal_chunked_and_whole(tiny_dir, method):
    runner = cpu_runner(tiny_dir, options=SaleOptions(dense_below=0))  # int8 estimate, the default
    if method == "sale":
        runner.set_method("sale", torch.full((2, 4), 0.05))
    ids = random_ids(641, runner.model.config.vocab_size, seed=2)[0].tolist()  # chunks of 128: the last has 1 row
    assert runner.prefill_chunk == 0, "the default on CPU is the whole prompt"
    whole = runner.generate(ids, max_new_tokens=6, min_new_tokens=6)
    runner.set_prefill_chunk(128)
    chunked = runner.generate(ids, max_new_tokens=6, min_new_tokens=6)
    assert chunked.text == whole.text and chunked.new_tokens == whole.new_tokens == 6
    assert chunked.input_tokens == 641 and chunked.prefill_ms > 0 and chunked.attn_ms > 0
    if method == "sale":
        assert chunked.density < 1 and whole.density < 1
    else:
        assert chunked.density == whole.density == 1.0


def test_a_one_token_last_chunk_goes_through_sale(tiny_dir):
    runner = cpu_runner(tiny_dir, options=SaleOptions(dense_below=0, estimate="none"), prefill_chunk=256)
    runner.set_method("sale", torch.full((2, 4), 0.2))
    seen = []
    original = sale_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return original(q, k, v, *args, **kwargs)

    import sale_cli.runner as runner_module

    runner_module.sale_attention = spy
    try:
        chunked = runner.prefill(random_ids(513, runner.model.config.vocab_size, seed=3))
    finally:
        runner_module.sale_attention = original
    assert seen == [(256, 256)] * 2 + [(256, 512)] * 2 + [(1, 513)] * 2
    runner.set_prefill_chunk(0)
    whole = runner.prefill(random_ids(513, runner.model.config.vocab_size, seed=3))
    assert torch.allclose(chunked.logits_last, whole.logits_last, atol=1e-4)


def test_only_the_last_position_reaches_the_head(tiny_dir):
    runner = cpu_runner(tiny_dir, prefill_chunk=128)
    shapes = []
    handle = runner.model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        runner.prefill(random_ids(300, runner.model.config.vocab_size))
        runner.generate(random_ids(300, runner.model.config.vocab_size)[0].tolist(), max_new_tokens=2, min_new_tokens=2)
    finally:
        handle.remove()
    vocab = runner.model.config.vocab_size
    assert shapes and all(s == (1, 1, vocab) for s in shapes), shapes


def test_calibration_with_chunks_records_the_chunk_and_bounds_every_chunk(tiny_dir, tmp_path):
    from sale_cli.data.calibration import kv_retrieval_sample

    runner = cpu_runner(tiny_dir, options=SaleOptions(dense_below=0), prefill_chunk=256)
    theta, out = 0.05, tmp_path / "t.safetensors"
    tau, density = calibrate(runner, theta, samples=1, tokens=600, out=out, tau0=0.64, progress=False)
    _, meta = thresholds_io.load(out)
    assert meta["prefill_chunk"] == "256" and meta["samples"] == "1"
    assert ((density > 0) & (density <= 1)).all()
    assert (tau > 0).any() and (tau < 0.64).any(), "the case must exercise the search"
    # every chunk's call of every head with tau > 0 is within theta, measured as the spec defines it
    count = lambda t: len(runner.tokenizer(runner.apply_chat_template(t), add_special_tokens=False).input_ids)  # noqa: E731
    prompt, _ = kv_retrieval_sample(0, 600, count)
    ids = runner.tokenizer(runner.apply_chat_template(prompt), add_special_tokens=False).input_ids
    errors = []

    def hook(layer, q, k, v, dense_out, scale):
        res = sale_attention(q, k, v, tau[layer], scale=scale, **runner.options.op_kwargs())
        errors.append((layer, (res.float() - dense_out.float()).abs().sum(dim=(2, 3)).mean(0) / q.shape[2]))

    with runner.capture(hook):
        runner.prefill(ids)
    assert len(errors) == 2 * len(runner.chunk_bounds(len(ids))) > 2
    for layer, err in errors:
        assert (err[tau[layer] > 0] < theta).all(), (layer, err, tau[layer])


def test_chunk_mismatch_with_the_thresholds_file_is_a_one_line_warning(tiny_dir, tmp_path, caplog):
    path = thresholds_io.save(tmp_path / "t.safetensors", torch.full((2, 4), 0.01), model=tiny_dir.name,
                              theta=0.4, tau0=0.008, samples=1, tokens=600, options=SaleOptions(),
                              prefill_chunk=256)
    with caplog.at_level(logging.WARNING, logger="sale_cli.runner"):
        runner = cpu_runner(tiny_dir, method="sale", thresholds=path, prefill_chunk=256)
        assert not caplog.records
        runner.set_prefill_chunk(512)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message and "--prefill-chunk 256" in message and "--prefill-chunk 512" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sale_cli.runner"):
        cpu_runner(tiny_dir, method="sale", thresholds=path, prefill_chunk=0)
    assert len(caplog.records) == 1 and "0 (whole prompt)" in caplog.records[0].getMessage()


def test_prefill_chunk_validation_messages(tiny_dir):
    assert check_prefill_chunk(0) == 0 and check_prefill_chunk(4096, 4096) == 4096
    for bad in (100, -64, 63, 1.5, True):
        with pytest.raises(ValueError, match="--prefill-chunk must be 0 .* positive multiple of 64"):
            check_prefill_chunk(bad)
    with pytest.raises(ValueError, match="--prefill-chunk 8192 exceeds the model's context of 4096 tokens"):
        check_prefill_chunk(8192, 4096)
    with pytest.raises(ValueError, match="--prefill-chunk must be"):
        load_runner("owner/not-loaded", prefill_chunk=96)  # refused before anything is loaded
    with pytest.raises(ValueError, match="--prefill-chunk 8192 exceeds"):
        cpu_runner(tiny_dir, prefill_chunk=8192)
    runner = cpu_runner(tiny_dir)
    with pytest.raises(ValueError, match="--prefill-chunk must be"):
        runner.set_prefill_chunk(65)
    assert runner.prefill_chunk == 0


@pytest.mark.parametrize("command", ["calibrate", "latency", "longbench", "infinitebench", "demo"])
def test_every_command_rejects_a_bad_prefill_chunk(command, tmp_path):
    from typer.testing import CliRunner

    from sale_cli.cli import app

    args = {"calibrate": ["calibrate", "nowhere"], "latency": ["latency", "nowhere", "--methods", "dense"],
            "longbench": ["longbench", "nowhere", "--exp", "x"], "infinitebench": ["infinitebench", "nowhere", "--exp", "x"],
            "demo": ["demo"]}[command]
    result = CliRunner().invoke(app, [*args, "--prefill-chunk", "100", "--results-dir", str(tmp_path)],
                                terminal_width=200)
    assert result.exit_code != 0
    said = result.output + str(result.exception or "")
    assert "--prefill-chunk must be 0 (whole prompt) or a positive multiple of 64 tokens, got 100" in said, said


def test_default_chunk_rule(monkeypatch):
    from transformers import LlamaConfig

    llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          num_hidden_layers=32, max_position_embeddings=131072)
    cpu = [torch.device("cpu")]
    assert default_prefill_chunk(llama8b, torch.bfloat16, cpu) == 0
    assert resolve_prefill_chunk(None, config=llama8b, dtype=torch.bfloat16, devices=cpu) == 0
    assert resolve_prefill_chunk(2048, config=llama8b, dtype=torch.bfloat16, devices=cpu) == 2048
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    free = {0: 20 << 30, 1: 80 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[d.index], 24 << 30))
    per_token = 2 * (3 * 14336 + 4 * 4096 + 48 * 128)  # bf16 bytes of one layer's transients per token
    chunk = default_prefill_chunk(llama8b, torch.bfloat16, gpus)  # the smaller free memory decides
    assert chunk == 2 ** int(math.log2((20 << 30) // 8 // per_token)) and chunk % 64 == 0 and chunk < 131072
    free[0] = 1 << 40
    assert default_prefill_chunk(llama8b, torch.bfloat16, gpus[:1]) == 0, "the whole context fits"
    free[0] = 1 << 20
    assert default_prefill_chunk(llama8b, torch.bfloat16, gpus[:1]) == 1024, "never below 1024 tokens"


# ---------------------------------------------------------------------------------------------------------------
# the runner's dense attention for chunks and decode: bottom-right


def _oracle(q, k, v, scale):
    Lq, Lk = q.shape[2], k.shape[2]
    G = q.shape[1] // k.shape[1]
    z = scale * q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    z = z.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq).to(z.device), -math.inf)
    return torch.softmax(z, -1) @ v.double().repeat_interleave(G, 1)


def _qkv(Lq, Lk, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(Lq)
    q, k, v = torch.randn(1, 8, Lk, 64, generator=g), torch.randn(1, 2, Lk, 64, generator=g), \
        torch.randn(1, 2, Lk, 64, generator=g)
    return q[:, :, Lk - Lq:].to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("Lq", [1, 64, 300, 900])
def test_runner_dense_attention_is_bottom_right(Lq):
    from sale_cli.runner import _sdpa, dense_attention

    q, k, v = _qkv(Lq, 900)
    want = _oracle(q, k, v, 0.125)
    for got in (dense_attention(q, k, v, 0.125), _sdpa(q, k, v, 0.125, None, True),
                _sdpa(q, k, v, 0.125, "LOWER_RIGHT", False)):
        assert (got.double() - want).abs().max() < 1e-5
    if 1 < Lq < 900:
        top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125,
                                                                    enable_gqa=True)
        assert (top_left.double() - want).abs().max() > 1e-2, "the test must tell the two alignments apart"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("Lq", [1, 1000, 4096])
def test_dense_paths_on_cuda_are_bottom_right(Lq):
    from sale_cli.kernels.api import causal_sdpa
    from sale_cli.runner import dense_attention

    q, k, v = _qkv(Lq, 8192, torch.bfloat16, "cuda")
    want = _oracle(q, k, v, 0.125)
    for got in (dense_attention(q, k, v, 0.125), causal_sdpa(q, k, v, 0.125)):
        assert (got.double() - want).abs().max() < 2e-2
    if 1 < Lq:  # the two-call cuDNN variant the chunk probe may pick, whether or not it picked it here
        from sale_cli.runner import _sdpa

        try:
            got = _sdpa(q, k, v, 0.125, "SPLIT", False)
        except (RuntimeError, AttributeError) as exc:
            pytest.skip(f"cuDNN attention not usable here: {exc}")
        assert (got.double() - want).abs().max() < 2e-2


# ---------------------------------------------------------------------------------------------------------------
# the demo model: greedy answers to passkey prompts, chunked vs whole


@pytest.mark.slow
def test_demo_model_passkey_answers_equal_chunked_and_whole(tmp_path):
    from sale_cli.data.passkey import found_key, passkey_prompt

    runner = load_runner("smollm2-135m", device="cpu", prefill_chunk=512)
    path = tmp_path / "theta_0.4.safetensors"
    calibrate(runner, 0.4, samples=1, tokens=1400, out=path, progress=False)
    count = lambda t: len(runner.tokenizer(t).input_ids)  # noqa: E731
    for seed, length in ((11, 1300), (12, 1700)):
        prompt, key = passkey_prompt(seed, length, count)
        ids = runner.tokenizer(prompt).input_ids
        for method in ("dense", "sale"):
            runner.set_method(method, path if method == "sale" else None)
            answers = {}
            for chunk in (512, 0):
                runner.set_prefill_chunk(chunk)
                answers[chunk] = runner.generate(ids, max_new_tokens=8)
            assert answers[512].text == answers[0].text, (method, seed, answers[512].text, answers[0].text)
            assert found_key(answers[0].text, key), (method, answers[0].text)
            if method == "sale":
                assert answers[512].density < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dense", "sale"])
def test_chunked_prefill_on_cuda_matches_the_whole_prompt(tmp_path, method):
    """On a GPU the chunk calls reach the CUDA kernel (Lq < Lk) and the lower-right dense path."""
    save_tiny_model(tmp_path, TEXT, vocab_size=300, hidden_size=256, intermediate_size=512, max_positions=8192,
                    sharpen=6.0)
    runner = load_runner(str(tmp_path), dtype="bfloat16", device="cuda", options=SaleOptions(dense_below=0),
                         prefill_chunk=0)
    if method == "sale":
        runner.set_method("sale", torch.full((2, 4), 0.3))
        assert runner.sale_backend == "cuda"
    ids = random_ids(3000, runner.model.config.vocab_size, seed=4)
    whole = runner.prefill(ids)
    runner.set_prefill_chunk(1024)
    chunked = runner.prefill(ids)
    assert (chunked.logits_last - whole.logits_last).abs().max() < 0.1
    assert chunked.density == pytest.approx(whole.density, abs=0.02)
    if method == "sale":
        assert chunked.density < 1
