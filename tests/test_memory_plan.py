"""The memory plan (sale_cli.memory_plan), `sale plan`, the placement at load and the out-of-memory message."""

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from sale_cli import memory_plan as mp
from sale_cli.errors import UserError

GiB = 2**30
TINY = mp.ModelShape(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=100,
                     max_context=4096)


def test_tiny_config_by_hand(monkeypatch):
    monkeypatch.setattr(mp, "DENSE_CHUNK_PATH", "mask")  # the hand numbers below are the explicit-mask path
    b = 2
    # q 64x64, k and v 64x32, o 64x64; gate/up/down 3x64x128; two norms of 64
    assert mp.layer_weight_bytes(TINY, b) == (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) * b == 73984
    assert mp.embedding_bytes(TINY, b) == 100 * 64 * 2 and mp.head_bytes(TINY, b) == (64 + 6400) * 2
    assert mp.kv_bytes_per_layer(TINY, b, 256) == 2 * 32 * 256 * 2 == 32768
    # a chunk of 64 queries over 256 keys: one channel over the chunk is 128 bytes
    st = mp.layer_stage_bytes(TINY, b, 64, 256, "dense")
    assert st["norm"] == 64 * 128 + 8 * 64 * 64 == 40960
    assert st["rope"] == (2 * 64 + 4 * 64 + 2 * 32) * 128 == 57344
    assert st["mlp"] == 3 * 64 * 128 + 3 * 128 * 128 == 73728
    assert st["update"] == (2 * 64 + 64 + 2 * 32) * 128 + 32 * (256 - 64) * 2 == 45056
    # dense chunk behind a prefix: the bool [64, 256] mask and its bf16 copy, plus the fp32 lse
    assert st["call"] == (2 * 64 + 64 + 64) * 128 + 3 * 64 * 256 + 4 * 64 * 4 == 82944
    held = 2 * 64 * 16 * 2 + 3 * 64 * 8 + 8 * 256 + 64 * 64 * 2
    g = mp.gpu_plan(TINY, b, 0, range(2), embedding=True, head=True, length=256, chunk=64, method="dense")
    assert (g.weights, g.kv_cache, g.activations) == (2 * 73984 + 12800 + 12928, 65536, 82944 + held)
    assert g.peak == 173696 + 65536 + 96768 + 2048
    assert g.need == g.peak + mp.HEADROOM_FIXED + int(0.1 * (65536 + 96768 + 2048))
    # the two-call cuDNN path: the prefix's K and V repeated to the 4 query heads (192 keys), the first output
    # (bf16) and its fp32 copy, or later the fp32 merge (five [64, 64] fp32 tensors); plus the lse
    assert mp.dense_workspace_bytes(TINY, b, 64, 256, "split") == \
        4 * 64 * 4 + max(2 * 64 * 192 * 2 + (2 + 4) * 64 * 64, 5 * 4 * 64 * 64) == 82944
    assert mp.dense_workspace_bytes(TINY, b, 256, 256, "split") == 4 * 256 * 4  # no prefix: the lse alone


def test_sale_workspace_by_hand():
    s = mp.ModelShape(num_layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                      vocab=128256)
    # a 16K chunk over 128K keys: quantized Q/K over the 96 MiB cap -> run per kv-head group (two bitmaps)
    per_kv = 16384 * (128 * 4 + 12 * 4 + 0) + 131072 * (128 + 4)
    bitmap = 32 * (16384 // 64) * (131072 // 32 // 32) * 4
    assert mp.sale_workspace_bytes(s, 16384, 131072) == min(8 * per_kv, 96 * 2**20) + 2 * bitmap + 32 * 16384 * 4
    assert 8 * per_kv > 96 * 2**20 and bitmap == 4 * 2**20
    with_map = mp.sale_workspace_bytes(s, 16384, 131072, block_map=True)
    assert with_map - mp.sale_workspace_bytes(s, 16384, 131072) == 32 * 256 * 4096


def test_weights_match_the_transformers_model():
    from transformers import LlamaConfig, Qwen2Config

    for cls, tied in ((LlamaConfig, False), (Qwen2Config, True)):
        cfg = cls(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        shape = mp.ModelShape.from_config(cfg)
        layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
        assert mp.layer_weight_bytes(shape, 2) == layer, cls.__name__
        total = sum(p.numel() for p in model.parameters()) * 2  # tied: one storage
        assert 3 * layer + mp.embedding_bytes(shape, 2) + mp.head_bytes(shape, 2) == total, cls.__name__


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    from sale_cli.eval.niah import write_config_dir

    path = tmp_path_factory.mktemp("cfg") / "llama-3.1-8b"
    write_config_dir(path, "llama-3.1-8b")
    return path


def _stage(shape, layers):
    return mp.ModelShape(**{**shape.__dict__, "num_layers": layers})


def test_llama_8b_predictions(llama8b):
    shape = mp.ModelShape.from_config(mp.load_config(str(llama8b)))
    assert (shape.num_layers, shape.vocab, shape.kv_heads, shape.max_context) == (32, 128256, 8, 131072)
    stage = _stage(shape, 8)

    def one(s, length, chunk, method="sale"):
        return mp.gpu_plan(s, 2, 0, range(s.num_layers), embedding=True, head=True, length=length, chunk=chunk,
                           method=method)

    # the H200 measurements (whole prompt, KV cache kept): 9.9 / 14.5 GiB for the stage at 32K / 64K,
    # 45.6 GiB for the whole model at 128K
    assert one(stage, 32768, 0).peak / GiB == pytest.approx(9.9, rel=0.03)
    assert one(stage, 65536, 0).peak / GiB == pytest.approx(14.5, rel=0.03)
    assert one(shape, 131072, 0).peak / GiB == pytest.approx(45.6, rel=0.03)
    for method in ("dense", "sale"):
        for length in (32768, 131072):
            p = mp.plan_memory(stage, dtype_bytes=2, length=length, method=method, budgets=[22 * GiB])
            assert p.fits and not p.spread and p.gpus[0].need <= 22 * GiB, (method, length)
        # at 128K the stage needs chunks on 22 GiB; the whole model does not fit 22 GiB but fits 44 GiB
        p128 = mp.plan_memory(stage, dtype_bytes=2, length=131072, method=method, budgets=[22 * GiB])
        assert p128.chunk > 0 and one(stage, 131072, 0, method).need > 22 * GiB
        assert not mp.plan_memory(shape, dtype_bytes=2, length=131072, method=method, budgets=[22 * GiB]).fits
        assert one(shape, 131072, 0, method).peak > 22 * GiB
        whole = mp.plan_memory(shape, dtype_bytes=2, length=131072, method=method, budgets=[44 * GiB])
        assert whole.fits and whole.chunk > 0 and whole.peak < 44 * GiB
    # at 32K the stage takes the whole prompt at once
    assert mp.plan_memory(stage, dtype_bytes=2, length=32768, method="sale", budgets=[22 * GiB]).chunk == 0


def test_chunk_choice_is_monotone_in_memory(llama8b):
    shape = mp.ModelShape.from_config(mp.load_config(str(llama8b)))
    for method in ("dense", "sale"):
        last = -1
        for gib in range(36, 80):  # dense chunks repeat the K/V prefix (about 2 GiB at 128K)
            p = mp.plan_memory(shape, dtype_bytes=2, length=131072, method=method, budgets=[gib * GiB],
                               allow_spread=False)
            size = 10**9 if p.chunk == 0 else p.chunk
            assert p.fits and size >= last, (method, gib)
            last = size
        assert last == 10**9  # enough memory: the whole prompt
    assert mp.chunk_candidates(1000) == [0, 512, 256, 128, 64]
    assert mp.chunk_candidates(131072)[:2] == [0, mp.CHUNK_CAP]


def test_placement_over_gpus(llama8b):
    shape = mp.ModelShape.from_config(mp.load_config(str(llama8b)))
    kw = dict(dtype_bytes=2, length=131072, method="sale", model="llama")
    p = mp.decide_placement(shape, budgets=[22 * GiB] * 4, **kw)
    assert p.plan.layers_per_gpu == [8, 8, 8, 8] and p.plan.fits and p.plan.chunk > 0
    assert "spread over 4 GPUs (8/8/8/8)" in p.note
    dm = p.device_map
    assert dm["model.embed_tokens"] == 0 and dm["lm_head"] == dm["model.norm"] == 3
    assert [dm[f"model.layers.{i}"] for i in (0, 7, 8, 31)] == [0, 0, 1, 3]
    # uneven memory: the smaller GPU takes fewer layers
    uneven = mp.decide_placement(shape, budgets=[12 * GiB, 22 * GiB, 22 * GiB], **kw).plan
    assert sum(uneven.layers_per_gpu) == 32 and uneven.layers_per_gpu[0] < uneven.layers_per_gpu[1]
    assert all(g.fits for g in uneven.gpus)
    # fits one GPU: stays there
    big = mp.decide_placement(shape, budgets=[80 * GiB] * 4, **kw)
    assert big.device_map is None and big.note is None and not big.plan.spread
    # under torchrun every rank holds the whole model: a clear error before loading
    with pytest.raises(UserError, match="one process"):
        mp.decide_placement(shape, budgets=[22 * GiB], world=4, **kw)
    assert mp.decide_placement(shape, budgets=[80 * GiB], world=4, **kw).device_map is None
    # not even spread: still spread (the best chance), with a warning
    tight = mp.decide_placement(shape, budgets=[6 * GiB] * 2, **kw)
    assert tight.device_map is not None and "warning" in tight.note
    # the runner's entry point does nothing on the CPU
    assert mp.placement_for_load(mp.load_config(str(llama8b)), dtype_bytes=2, length=None, method="dense",
                                 device="cpu") is None


def test_device_map_names_every_module(tmp_path):
    """The explicit map loads a Llama and a tied Qwen2 (on the CPU here: GPU indices mapped to 'cpu')."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    for cls, tied in ((LlamaConfig, False), (Qwen2Config, True)):
        cfg = cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied)
        path = tmp_path / cls.__name__
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        shape = mp.ModelShape.from_config(cfg)
        gpus = mp.even_split(shape, 4, [GiB] * 2, length=512, chunk=0, method="dense")
        dm = mp.MemoryPlan("tiny", shape, 4, 512, "dense", 0, gpus).device_map()
        assert [dm[f"model.layers.{i}"] for i in range(4)] == [0, 0, 1, 1]
        assert (dm["lm_head"] == 0) == tied
        model = AutoModelForCausalLM.from_pretrained(path, device_map={k: "cpu" for k in dm})
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)


def test_prediction_matches_live_tensors_on_cpu(tmp_path, monkeypatch):
    """KV cache plus activations as predicted vs the bytes of tensors alive at once in a real forward (a tiny
    Llama in bf16 on the CPU, counted op by op): exact shapes of the whole-prompt forward, and an upper bound
    within 15% for chunks behind a cache (the CPU's SDPA takes the bool mask without a float copy)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from sale_cli.options import SaleOptions
    from sale_cli.runner import Runner, register_attention

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[key]
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                    self.live[t.untyped_storage().data_ptr()] = (StorageWeakRef(t.untyped_storage()),
                                                                 t.untyped_storage().nbytes())
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    register_attention()
    cfg = LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sale").to(torch.bfloat16).eval()
    Runner(model, None, "tiny", SaleOptions())  # attaches its attention state to every attention module
    monkeypatch.setattr(mp, "DENSE_CHUNK_PATH", "mask")  # what the runner's dense chunks do on the CPU
    shape, L = mp.ModelShape.from_config(cfg), 1024
    ids = torch.randint(0, 500, (1, L))
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for chunk in (0, 256):
        cache, counter = DynamicCache(config=cfg), LiveBytes()
        with torch.inference_mode(), counter:
            for start in range(0, L, chunk or L):
                model(ids[:, start:start + (chunk or L)], logits_to_keep=1, use_cache=True,
                      **{cache_kw: cache})
        g = mp.gpu_plan(shape, 2, 0, range(2), embedding=True, head=True, length=L, chunk=chunk, method="dense")
        predicted = g.kv_cache + g.activations
        if chunk == 0:
            assert counter.peak == pytest.approx(predicted, rel=0.01)
        else:
            assert counter.peak <= predicted <= 1.15 * counter.peak


# ---------------------------------------------------------------------------------------------- sale plan


def _plan(args):
    from sale_cli.cli import app

    return CliRunner().invoke(app, ["plan", *args], terminal_width=200)


def test_plan_command(llama8b):
    ok = _plan([str(llama8b), "--length", "131072", "--gpu-memory-gib", "22", "--gpus", "4"])
    assert ok.exit_code == 0, ok.output
    assert "8/8/8/8 over 4 GPUs" in ok.output and "prefill chunk 16384" in ok.output and "embedding" in ok.output
    one = _plan([str(llama8b), "--length", "131072", "--gpu-memory-gib", "44", "--method", "dense"])
    assert one.exit_code == 0 and "fits: one GPU" in one.output
    short = _plan([str(llama8b), "--length", "32768", "--gpu-memory-gib", "40", "--gpus", "1"])
    assert short.exit_code == 0 and "whole prompt" in short.output
    no = _plan([str(llama8b), "--length", "131072", "--gpu-memory-gib", "22", "--gpus", "1"])
    assert no.exit_code == 1 and "does not fit one GPU at 131072 tokens" in no.output and "more GPUs" in no.output
    whole = _plan([str(llama8b), "--gpu-memory-gib", "22", "--gpus", "4", "--prefill-chunk", "0"])
    assert whole.exit_code == 1 and "smaller --prefill-chunk" in whole.output  # --length: the model's context


@pytest.mark.parametrize("args, option", [
    (["--prefill-chunk", "100"], "--prefill-chunk"),
    (["--prefill-chunk", "-64"], "--prefill-chunk"),
    (["--method", "flash"], "--method"),
    (["--length", "0"], "--length"),
    (["--dtype", "int3"], "--dtype"),
    (["--length", "1024", "--prefill-chunk", "2048"], "--prefill-chunk"),
])
def test_plan_command_bad_options(llama8b, args, option):
    result = _plan([str(llama8b), "--gpu-memory-gib", "22", *args])
    assert result.exit_code == 2 and option in result.output


def test_plan_command_errors(tmp_path, llama8b):
    missing = _plan([str(tmp_path / "nowhere"), "--gpu-memory-gib", "22"])
    assert missing.exit_code == 1 and "error:" in missing.output
    bad = _plan([str(llama8b), "--gpu-memory-gib", "0"])
    assert bad.exit_code == 1 and "--gpu-memory-gib" in bad.output
    if not torch.cuda.is_available():
        no_gpu = _plan([str(llama8b)])
        assert no_gpu.exit_code == 1 and "--gpu-memory-gib" in no_gpu.output


# ---------------------------------------------------------------------------------------------- out of memory


class OomRunner:
    memory_plan = None
    prefill_chunk = 4096

    def __init__(self, fail_at):
        self.fail_at, self.calls = fail_at, 0

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB")
        from types import SimpleNamespace

        return SimpleNamespace(text="x", input_tokens=len(input_ids), attn_ms=1.0, density=1.0)


def test_out_of_memory_is_one_line_and_keeps_predictions(tmp_path):
    from sale_cli.eval import common

    out = common.PredictionFile(tmp_path / "preds.jsonl", "id")
    samples = [{"id": i} for i in range(4)]
    with pytest.raises(UserError) as err:
        common.generate_all(OomRunner(fail_at=3), samples, "id", out, lambda s: common.Prepared([1] * 100, 4),
                            lambda s, res: {"id": s["id"], "pred": res.text}, "passkey")
    message = str(err.value)
    assert "\n" not in message and "out of GPU memory" in message and "4096 tokens" in message
    assert "--prefill-chunk" in message and "--max-length" in message and "id 2" in message
    assert [json.loads(line)["id"] for line in (tmp_path / "preds.jsonl").read_text().splitlines()] == [0, 1]
    # other errors pass through unchanged
    with pytest.raises(ValueError, match="boom"):
        with common.oom_as_user_error(OomRunner(0), 10, "here"):
            raise ValueError("boom")


def test_latency_records_and_table_show_peaks_per_gpu():
    from rich.console import Console

    from sale_cli.eval import niah

    prompt = niah.NiahPrompt([1] * 8, 2, 1, 6, 5, 1, 0.5)
    peaks = [{"gpu": 0, "peak_allocated_mib": 2048.0, "peak_reserved_mib": 2100.0, "total_mib": 81559.0},
             {"gpu": 1, "peak_allocated_mib": 3072.0, "peak_reserved_mib": 3100.0, "total_mib": 81559.0}]
    m = niah.Measurement("dense", 8, [niah.Sample(1.0, 0.5, 1.0, {})], peaks=peaks)
    env = {"device": "cuda:0", "gpu": "H200", "torch": "x", "cuda": "12", "dense_backend": "sdpa:flash",
           "sale_backend": "cuda", "model": "m"}
    (rec,) = niah.summarize([m], {8: prompt}, env)
    assert rec["peak_mib"] == 3072.0 and rec["peak_mib_per_gpu"] == [2048.0, 3072.0]
    assert rec["peak_reserved_mib_per_gpu"] == [2100.0, 3100.0]
    console = Console(record=True, width=250)
    console.print(niah.latency_table([rec], env))
    assert "2.0/3.0" in console.export_text()


# ---------------------------------------------------------------------------------------------- load_runner


class _Loaded(Exception):
    pass


def _mock_gpus(monkeypatch, count, gib, world=None):
    monkeypatch.setattr(mp, "visible_gpus", lambda: count)
    monkeypatch.setattr(mp, "free_memory", lambda: [gib * GiB] * count)
    monkeypatch.setattr("sale_cli.runner.check_device", lambda device: device)  # "cuda" on this CPU-only build
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", str(world))


def test_load_runner_spreads_a_model_that_does_not_fit_one_gpu(monkeypatch, llama8b, capsys):
    from transformers import AutoModelForCausalLM

    from sale_cli.runner import load_runner

    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    _mock_gpus(monkeypatch, 4, 22)
    with pytest.raises(_Loaded):
        load_runner(str(llama8b), device="cuda", dtype="bfloat16", length=131072)
    dm = seen["device_map"]
    assert isinstance(dm, dict) and dm["model.layers.0"] == 0 and dm["model.layers.31"] == 3 and dm["lm_head"] == 3
    assert "spread over 4 GPUs (8/8/8/8)" in capsys.readouterr().err
    # fits one GPU at 8K tokens: no map, nothing said
    seen.clear()
    with pytest.raises(_Loaded):
        load_runner(str(llama8b), device="cuda", dtype="bfloat16", length=8192)
    assert seen["device_map"] is None and "spread" not in capsys.readouterr().err
    # an explicit device_map is the user's choice
    seen.clear()
    with pytest.raises(_Loaded):
        load_runner(str(llama8b), device="cuda", dtype="bfloat16", device_map="auto")
    assert seen["device_map"] == "auto"


def test_load_runner_under_torchrun_fails_before_loading_weights(monkeypatch, llama8b):
    from sale_cli.runner import load_runner

    _mock_gpus(monkeypatch, 4, 22, world=4)
    with pytest.raises(UserError, match="torchrun.*one process"):
        load_runner(str(llama8b), device="cuda:1", dtype="bfloat16")  # --length default: the model's 128K


def test_choose_chunk(llama8b, monkeypatch):
    cfg = mp.load_config(str(llama8b))
    kw = dict(dtype_bytes=2, length=131072, method="sale")
    assert mp.choose_chunk(cfg, budgets=[200 * GiB], **kw) == 0
    assert mp.choose_chunk(cfg, budgets=[40 * GiB], **kw) == mp.CHUNK_CAP
    assert 0 < mp.choose_chunk(cfg, budgets=[33.9 * GiB], **kw) < mp.CHUNK_CAP
    assert mp.choose_chunk(cfg, budgets=[10 * GiB], **kw) == mp.CHUNK_CAP  # nothing fits
    monkeypatch.setattr(mp, "free_memory", lambda: [])
    assert mp.choose_chunk(cfg, **kw) == 0  # no GPU
