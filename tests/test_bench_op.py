"""`sale bench-op`: options, the no-GPU error, row arithmetic, synthetic data, and the runner on CPU with a fake
CUDA backend (the real block-sparse helpers, eager FlexAttention)."""

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from sale_cli.cli import app
from sale_cli.commands import bench_op as bench_op_command
from sale_cli.commands.common import parse_choices
from sale_cli.data.synthetic_qkv import make_inputs, random_qkv
from sale_cli.eval import bench_op
from sale_cli.kernels import block_sparse


def _invoke(*args):
    return CliRunner().invoke(app, ["bench-op", *args], terminal_width=200)


def test_help_lists_the_options():
    result = _invoke("--help")
    assert result.exit_code == 0, result.output
    for option in ("--lengths", "--heads", "--kv-heads", "--head-dim", "--dtype", "--data", "--taus", "--thresholds",
                   "--layer", "--estimates", "--computes", "--granularities", "--sdpa", "--reps", "--warmup",
                   "--exp", "--out", "128x64", "CUDA GPU"):  # fmt: skip
        assert option in result.output, option


def test_without_cuda_exits_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = _invoke("--lengths", "256")
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, option",
    [
        (["--granularities", "64x48"], "--granularities"),
        (["--granularities", "fine"], "--granularities"),
        (["--estimates", "int8,int2"], "--estimates"),
        (["--computes", "triton"], "--computes"),
        (["--sdpa", "math"], "--sdpa"),
        (["--data", "zeros"], "--data"),
        (["--taus", "0.004,0"], "--taus"),
        (["--taus", "small"], "--taus"),
        (["--lengths", "0"], "--lengths"),
        (["--heads", "12"], "--heads"),
        (["--dtype", "fp8"], "--dtype"),
        (["--reps", "0"], "--reps"),
        (["--layer", "3"], "--layer"),
    ],
)
def test_bad_values_name_the_option(args, option):
    result = _invoke(*args)
    assert result.exit_code == 2 and option in result.output, result.output


def _thresholds_file(tmp_path, layers, heads):
    from sale_cli import thresholds
    from sale_cli.options import SaleOptions

    path = tmp_path / "tau.safetensors"
    tau = torch.full((layers, heads), 0.004) * torch.arange(1, layers + 1)[:, None]
    thresholds.save(path, tau, model="m", theta=0.4, tau0=0.008, samples=1, tokens=1, options=SaleOptions())
    return path


def test_thresholds_file_must_match_heads_and_layer(tmp_path):
    path = _thresholds_file(tmp_path, layers=4, heads=16)
    wrong_heads = _invoke("--thresholds", str(path))
    assert wrong_heads.exit_code == 2 and "--thresholds" in wrong_heads.output
    assert "16 query heads" in wrong_heads.output
    wrong_layer = _invoke("--thresholds", str(path), "--heads", "16", "--layer", "4")
    assert wrong_layer.exit_code == 2 and "--layer" in wrong_layer.output
    tau, layer, meta = bench_op_command.file_thresholds(path, None, 16)
    assert layer == 2 and tau == pytest.approx([0.012] * 16) and meta["theta"] == "0.4"


def test_choices_and_granularities_parse():
    assert parse_choices(["int4", "int8 int4"], bench_op.ESTIMATES, ("x",), "--e") == ("int4", "int8")
    assert parse_choices(None, bench_op.COMPUTES, bench_op.COMPUTES, "--c") == ("cuda", "flex")
    assert [bench_op.parse_granularity(g) for g in bench_op.GRANULARITIES] == [(64, 32), (128, 64), (128, 128)]
    with pytest.raises(ValueError, match="is not QxK"):
        bench_op.parse_granularity("96x32")


def test_arithmetic_of_rows():
    L, heads, d = 1024, 4, 64
    flops = bench_op.causal_flops(L, heads, d)
    assert flops == 4 * heads * d * L * (L + 1) / 2
    case = {"length": L, "data": "structured"}
    split = bench_op.stage_split(0.5, 2.0, 4.0)
    assert split == {"quant_ms": 0.5, "select_ms": 1.5, "compute_ms": 2.0}
    assert bench_op.stage_split(None, 2.0, 4.0)["select_ms"] is None
    rows = [
        bench_op._row(case, kind="sdpa", method="sdpa cudnn", backend="cudnn", ms=10.0, density=1.0),
        bench_op._row(case, kind="sdpa", method="sdpa flash", backend="flash", ms=14.0, density=1.0),
        bench_op._row(case, kind="sdpa", method="sdpa efficient", backend="efficient", error="RuntimeError: no"),
        bench_op._row(case, kind="sale", method="sale", estimate="int8", compute="cuda", tau=0.004,
                      tau_label="0.004", density=0.2, ms=4.0, **split),
        bench_op._row(case, kind="sale", method="sale", estimate="int4", compute="flex", error="OutOfMemoryError"),
    ]  # fmt: skip
    cudnn, flash, efficient, sale, oom = bench_op.finish_rows(rows, flops)
    assert {r["baseline"] for r in (cudnn, sale, oom)} == {"cudnn"}
    assert cudnn["speedup"] == 1.0 and flash["speedup"] == pytest.approx(10 / 14)
    assert sale["speedup"] == pytest.approx(2.5) and sale["speedup_flash"] == pytest.approx(3.5)
    assert sale["overhead_pct"] == pytest.approx(20.0) and cudnn["overhead_pct"] is None
    assert sale["tflops"] == pytest.approx(flops / 4e-3 / 1e12) and cudnn["tflops"] == pytest.approx(flops / 1e10)
    assert efficient["tflops"] is efficient["speedup"] is oom["speedup"] is None
    table = Console(record=True, width=250)
    table.print(bench_op.bench_table([cudnn, flash, efficient, sale, oom], "t"))
    shown = table.export_text()
    assert "2.50x" in shown and "3.50x" in shown and "0.50 / 1.50 / 2.00" in shown and "OutOfMemoryError" in shown
    md = bench_op.markdown_table([cudnn, sale]).splitlines()
    assert len(md) == 4 and md[0].startswith("| L | data | method") and md[3].startswith("| 1K | structured | sale")


def test_measure_rotates_input_sets_after_warmup():
    seen = []
    runs = bench_op.measure(seen.append, warmup=2, reps=3, elapsed_ms=lambda fn: fn() or 1.0)
    assert seen == [0, 1, 0, 1, 0] and runs == [1.0, 1.0, 1.0]


def test_structured_data_on_cpu_has_a_sink():
    L, heads, kv_heads, d = 256, 8, 2, 64
    q, k, v = make_inputs("structured", L, heads, kv_heads, d, torch.bfloat16, seed=0, device="cpu")
    assert q.shape == (1, heads, L, d) and k.shape == v.shape == (1, kv_heads, L, d)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    kr = k.float().repeat_interleave(heads // kv_heads, 1)
    logits = q.float() @ kr.transpose(-1, -2) / math.sqrt(d)
    assert torch.allclose(logits[..., 0], torch.full_like(logits[..., 0], 10.0), atol=0.15)  # sink logit 10
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, -math.inf).softmax(-1)
    assert (probs.mean(dim=2).argmax(-1) == 0).all()  # key 0 takes the most attention in every head
    again = make_inputs("structured", L, heads, kv_heads, d, torch.bfloat16, seed=0, device="cpu")
    other = make_inputs("structured", L, heads, kv_heads, d, torch.bfloat16, seed=1, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again, strict=True))
    assert not torch.equal(q, other[0])
    rq, rk, rv = make_inputs("random", L, heads, kv_heads, d, torch.float16, seed=0, device="cpu")
    assert rq.shape == q.shape and rk.shape == rv.shape == k.shape and rq.dtype == torch.float16


class HostTimer:
    """The runner's timer on the CPU: host clock, no memory figures."""

    device = "cpu"

    def __init__(self):
        self.freed = 0

    def elapsed_ms(self, fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def peak_mib(self, fn):
        return fn(), 1.5

    def free(self):
        self.freed += 1


def _fake_cuda(calls):
    """cuda_backend's interface: keeps even key blocks (and every block at tau 0); int4 + flex runs out of memory."""

    def sale_attention_cuda(q, k, v, thresholds, *, scale, block_q, block_k, sink_tokens, local_window, estimate,
                            quant_group, need_block_map, need_lse, timing, compute, stop_after):  # fmt: skip
        calls.append((estimate, compute, stop_after, need_block_map))
        assert (scale, sink_tokens, local_window, quant_group, need_lse, timing) == (None, None, 128, "per_token",
                                                                                      False, False)  # fmt: skip
        if estimate == "int4" and compute == "flex" and stop_after is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (fake)")
        B, Hq, L, _ = q.shape
        vis = block_sparse.visible_block_map(L, block_q, block_k)
        even = torch.arange(vis.shape[1]) % 2 == 0
        block_map = vis & (even | (thresholds == 0)[:, None, None])
        block_map = block_map.expand(B, Hq, *vis.shape)
        density = block_sparse.map_density(block_map, L, block_q, block_k)
        if stop_after == "quant":
            return None, None, None, None, None
        if stop_after == "select":
            return None, None, block_map if need_block_map else None, density, None
        out = block_sparse.flex_block_sparse_attention(q, k, v, block_map, block_q=block_q, block_k=block_k)
        return out, None, block_map if need_block_map else None, density, None

    return SimpleNamespace(sale_attention_cuda=sale_attention_cuda)


def test_runner_on_cpu_with_a_fake_backend(tmp_path):
    calls = []
    heads, settings = 4, bench_op.make_settings(4, [0.004], ["int8", "int4"], [0.002, 0.0, 0.004, 0.008], "file L1")
    cfg = bench_op.BenchConfig(
        lengths=(128,), data=("structured", "random"), heads=heads, kv_heads=2, head_dim=64, dtype="bf16",
        settings=settings, computes=("cuda", "flex"), granularities=bench_op.GRANULARITIES,
        sdpa=tuple(bench_op.SDPA_BACKENDS), reps=2, warmup=1,
    )  # fmt: skip
    timer, console = HostTimer(), Console(record=True, width=250)
    path = tmp_path / "exp" / "bench_op.json"
    ops = bench_op.Ops(_fake_cuda(calls), block_sparse)
    rows = bench_op.run_bench(cfg, ops, timer, path, {"environment": {"device": "cpu"}, "config": {}},
                              on_row=lambda row: console.print(bench_op.progress_line(row)), on_length=console.print)
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(rows))
    for data in cfg.data:
        got = {(r["kind"], r["method"], r["estimate"], r["compute"], r["tau_label"]): r
               for r in rows if r["data"] == data}  # fmt: skip
        assert len(got) == len([r for r in rows if r["data"] == data]) == 3 + 10 + 2 * 4
        cudnn, flash = got[("sdpa", "sdpa cudnn", None, None, None)], got[("sdpa", "sdpa flash", None, None, None)]
        assert cudnn["error"] and cudnn["ms"] is None  # no cuDNN on a CPU: a row with the reason
        assert flash["gqa"] == "native" and flash["speedup"] == 1.0 and flash["baseline"] == "flash"
        dense = got[("sale", "sale", "int8", "cuda", "0")]
        assert dense["density"] == 1.0 and ("sale", "sale", "int4", "cuda", "0") not in got
        for label in ("0.004", "file L1"):
            oom = got[("sale", "sale", "int4", "flex", label)]
            assert oom["error"].startswith("OutOfMemoryError") and oom["ms"] is None
            sale = got[("sale", "sale", "int8", "cuda", label)]
            assert sale["ms"] > 0 and len(sale["ms_runs"]) == 2 and sale["peak_mib"] == sale["select_peak_mib"] == 1.5
            assert sale["quant_ms"] is not None and sale["ms"] == pytest.approx(
                sale["quant_ms"] + sale["select_ms"] + sale["compute_ms"])
            assert sale["speedup"] > 0 and sale["overhead_pct"] is not None and sale["tflops"] > 0
            fine = got[("granularity", "compute 64x32", "int8", "flex", label)]
            coarse = got[("granularity", "compute 128x128", "int8", "flex", label)]
            assert fine["density"] == pytest.approx(sale["density"]) and fine["ms"] > 0
            assert sale["density"] < coarse["density"] <= 1.0
            reference = got[("granularity", "compute 64x32", "int8", "cuda", label)]
            assert reference["ms"] == sale["compute_ms"] and reference["note"]
    # per (data, setting, estimate): the two stop variants, warmup + reps calls each, and one more stop after select
    # for its peak memory, with our compute pass named (its stop after select leaves out FlexAttention's bitmap
    # conversion); per (data, setting with a granularity trade-off): the block map of each input set
    stops = [c for c in calls if c[2] is not None and not c[3]]
    assert len(stops) == 2 * (1 + 2 + 2) * (2 * (cfg.warmup + cfg.reps) + 1) and {c[1] for c in stops} == {"cuda"}
    assert [c for c in calls if c[3]] == [("int8", "cuda", "select", True)] * 2 * 2 * bench_op.INPUT_SETS
    assert timer.freed >= 2 * 2 + 2  # after each OOM and after each (length, data)
    shown = console.export_text()
    assert "bench-op · 128 tokens · cpu" in shown and "compute 128x64" in shown and "OutOfMemoryError" in shown


def test_sdpa_repeats_kv_when_a_backend_rejects_gqa(monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def no_gqa(q, k, v, **kwargs):
        if kwargs.get("enable_gqa"):
            raise RuntimeError("No available kernel. Aborting execution.")
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_gqa)
    inputs = [random_qkv(128, 4, 2, 32, torch.float32, seed=s, device="cpu") for s in range(2)]
    call, gqa = bench_op._sdpa_call("flash", inputs)
    q, k, v = inputs[1]
    assert gqa == "repeated"
    assert torch.allclose(call(1), sdpa(q, k, v, is_causal=True, enable_gqa=True), atol=1e-5)
    with pytest.raises(RuntimeError, match="No viable backend"):
        bench_op._sdpa_call("cudnn", inputs)


def test_calls_bind_to_the_cuda_backend_signature():
    import inspect

    from sale_cli.kernels import cuda_backend

    signature = inspect.signature(cuda_backend.sale_attention_cuda)
    ops = bench_op.Ops(SimpleNamespace(sale_attention_cuda=lambda *a, **kw: signature.bind(*a, **kw)), None)
    inputs = [random_qkv(64, 2, 1, 16, torch.float32, seed=s, device="cpu") for s in range(2)]
    bound = bench_op._sale_call(ops, inputs, torch.zeros(2), "int4", "flex", stop_after="select")(1)
    assert bound.arguments["compute"] == "flex" and bound.arguments["stop_after"] == "select"
    assert bound.arguments["q"] is inputs[1][0] and set(cuda_backend.STOP_AFTER) >= {None, "quant", "select"}
    assert set(bench_op.COMPUTES) <= set(cuda_backend.COMPUTES) and set(bench_op.ESTIMATES) <= set(cuda_backend.ESTIMATE_BITS)


def test_runner_records_failed_inputs_and_keeps_finished_lengths(tmp_path, monkeypatch):
    make = bench_op.make_inputs

    def flaky(data, length, *args, **kwargs):
        if length == 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if length == 192:
            raise KeyboardInterrupt
        return make(data, length, *args, **kwargs)

    monkeypatch.setattr(bench_op, "make_inputs", flaky)
    cfg = bench_op.BenchConfig(
        lengths=(64, 128, 192), data=("random",), heads=2, kv_heads=1, head_dim=16, dtype="bf16",
        settings=bench_op.make_settings(2, [], ["int8"]), computes=("cuda",), granularities=(), sdpa=("flash",),
        reps=1, warmup=0,
    )  # fmt: skip
    path = tmp_path / "bench_op.json"
    ops = bench_op.Ops(_fake_cuda([]), None)
    with pytest.raises(KeyboardInterrupt):
        bench_op.run_bench(cfg, ops, HostTimer(), path, {"environment": {"device": "cpu"}})
    rows = json.loads(path.read_text())["rows"]
    assert [(r["length"], r["method"]) for r in rows] == [(64, "sdpa flash"), (64, "sale"), (128, "inputs")]
    assert rows[2]["error"].startswith("OutOfMemoryError") and set(rows[2]) == set(rows[0])
