"""Device check of the memory plan (issue 14), one H200, one call, about 5-7 minutes:

1. GPU capped at 22 GiB (torch.cuda.set_per_process_memory_fraction): one pipeline stage of Llama-3.1-8B (8 layers,
   full 128256-token vocabulary, random weights) prefills 128K tokens, dense and SALE (tau 0.004 on every head), at
   the chunk the plan chooses; the whole prompt at once is expected to run out of memory there.
2. Capped at 44 GiB: the whole 32-layer model at 128K, dense and SALE, at the plan's chunk.
3. Uncapped: prefill time at 128K over the 32 layers, chunked (the plan's chunk) vs the whole prompt, dense and SALE.

Each run prints the measured peak (torch.cuda.max_memory_allocated and max_memory_reserved, weights included) next
to the plan's prediction. "generate" runs are runner.generate(ids, 1): a prefill that keeps the KV cache (what the
benchmarks do; the plan assumes it); "prefill" runs are runner.prefill(ids), whose whole-prompt forward keeps no
cache (predicted with cached=False there).

Interface assumed from the chunked-prefill work (not on this branch when written): ``load_runner(...,
prefill_chunk=N)`` and a ``runner.prefill_chunk`` attribute read by ``runner.prefill`` / ``runner.generate``
(0 = whole prompt). Without them only whole-prompt runs happen (chunked ones print "no chunking in runner").

    python scripts/device_memory_check.py [--length 131072] [--repeats 2] [--skip-timing]
Writes $OUT/memory_check.json (or ./memory_check.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `sale` sets it

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sale_cli import memory_plan as mp  # noqa: E402
from sale_cli.eval.niah import write_config_dir  # noqa: E402
from sale_cli.runner import load_runner  # noqa: E402

GiB = 2**30
TAU = 0.004
ROWS: list[dict] = []


def config_dir(root: Path, layers: int) -> Path:
    path = root / f"llama-3.1-8b-{layers}l"
    cfg = write_config_dir(path, "llama-3.1-8b")
    if layers != cfg.num_hidden_layers:
        cfg.num_hidden_layers = layers
        cfg.save_pretrained(path)
    return path


def cap(gib: float | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else gib * GiB / total)


def load(path: Path, chunk: int):
    try:
        runner = load_runner(str(path), random_weights=True, dtype="bfloat16", device="cuda", prefill_chunk=chunk)
    except TypeError:  # no chunked prefill in this runner yet
        runner = load_runner(str(path), random_weights=True, dtype="bfloat16", device="cuda")
    runner.set_method("sale", torch.full((runner.num_layers, runner.num_heads), TAU))
    return runner


def set_chunk(runner, chunk: int) -> bool:
    if not hasattr(runner, "prefill_chunk"):
        return chunk == 0
    runner.prefill_chunk = chunk
    return True


def predicted(shape: mp.ModelShape, length: int, chunk: int, method: str, cached: bool) -> int:
    return mp.gpu_plan(shape, 2, 0, range(shape.num_layers), embedding=True, head=True, length=length, chunk=chunk,
                       method=method, cached=cached).peak


def measure(label: str, runner, shape, ids, method: str, chunk: int, kind: str, cap_gib: float | None) -> dict:
    row = {"case": label, "method": method, "chunk": chunk, "run": kind, "cap_gib": cap_gib,
           "predicted_gib": predicted(shape, ids.shape[1], chunk, method, cached=kind == "generate" or chunk > 0) / GiB}
    if not set_chunk(runner, chunk):
        row["error"] = "no chunking in runner"
        return _show(row)
    runner.set_method(method)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        if kind == "generate":
            runner.generate(ids[0].tolist(), max_new_tokens=1)
        else:
            row["prefill_ms"] = runner.prefill(ids).prefill_ms
        torch.cuda.synchronize()
        row["allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        row["error_pct"] = 100 * (row["predicted_gib"] - row["allocated_gib"]) / row["allocated_gib"]
    except torch.cuda.OutOfMemoryError:
        row["error"] = f"out of memory (peak allocated {torch.cuda.max_memory_allocated() / GiB:.1f} GiB)"
    row["wall_s"] = time.perf_counter() - start
    gc.collect()
    torch.cuda.empty_cache()
    return _show(row)


def _show(row: dict) -> dict:
    ROWS.append(row)
    f = lambda k, spec=".2f": "-" if row.get(k) is None else format(row[k], spec)  # noqa: E731
    print(f"{row['case']:<22} {row['method']:<5} chunk {row['chunk']:>6} {row['run']:<8} cap {row['cap_gib'] or '-':>4}"
          f"  predicted {f('predicted_gib')} GiB  allocated {f('allocated_gib')}  reserved {f('reserved_gib')}"
          f"  diff {f('error_pct', '+.1f')}%  prefill {f('prefill_ms', '.0f')} ms  {row.get('error', '')}",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=2, help="timed prefills per (method, chunk) after one warm-up")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="sale-memcheck-"))
    L = args.length
    ids = torch.randint(0, 128256, (1, L), generator=torch.Generator().manual_seed(0))
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, length {L}", flush=True)

    # 1. one pipeline stage under 22 GiB
    stage_dir = config_dir(root, 8)
    stage = mp.ModelShape.from_config(mp.load_config(str(stage_dir)))
    cap(22)
    chunks = {m: mp.plan_memory(stage, dtype_bytes=2, length=L, method=m, budgets=[22 * GiB]).chunk
              for m in ("dense", "sale")}
    print(f"plan, 8 layers at 22 GiB: chunks {chunks}", flush=True)
    runner = load(stage_dir, chunks["sale"])
    for method in ("dense", "sale"):
        measure("8 layers, 22 GiB", runner, stage, ids, method, chunks[method], "generate", 22)
        measure("8 layers, 22 GiB", runner, stage, ids, method, chunks[method], "prefill", 22)
    measure("8 layers, 22 GiB", runner, stage, ids, "sale", 0, "generate", 22)  # expected: out of memory
    del runner
    gc.collect()
    torch.cuda.empty_cache()

    # 2. the whole model under 44 GiB
    model_dir = config_dir(root, 32)
    shape = mp.ModelShape.from_config(mp.load_config(str(model_dir)))
    cap(44)
    chunks = {m: mp.plan_memory(shape, dtype_bytes=2, length=L, method=m, budgets=[44 * GiB]).chunk
              for m in ("dense", "sale")}
    print(f"plan, 32 layers at 44 GiB: chunks {chunks}", flush=True)
    runner = load(model_dir, chunks["sale"])
    for method in ("dense", "sale"):
        measure("32 layers, 44 GiB", runner, shape, ids, method, chunks[method], "generate", 44)

    # 3. prefill time, chunked vs whole prompt, uncapped
    cap(None)
    if not args.skip_timing:
        for method in ("dense", "sale"):
            for chunk in (chunks[method], 0):
                for rep in range(args.repeats + 1):
                    row = measure("32 layers, timing" if rep else "32 layers, warm-up", runner, shape, ids, method,
                                  chunk, "prefill", None)
                    if rep == 0:
                        ROWS.remove(row)
                    if "error" in row:
                        break
        timing = {}
        for r in ROWS:
            if r["case"] == "32 layers, timing" and "prefill_ms" in r:
                timing.setdefault((r["method"], r["chunk"]), []).append(r["prefill_ms"])
        for method in ("dense", "sale"):
            whole, chunked = timing.get((method, 0)), timing.get((method, chunks[method]))
            if whole and chunked:
                w, c = sorted(whole)[len(whole) // 2], sorted(chunked)[len(chunked) // 2]
                print(f"{method}: whole prompt {w:.0f} ms, chunk {chunks[method]} {c:.0f} ms ({100 * (c / w - 1):+.1f}%)")
    out = Path(os.environ.get("OUT", ".")) / "memory_check.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "length": L,
                               "rows": ROWS, "seconds": time.perf_counter() - t0}, indent=2))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
