"""Capture real attention inputs (Q, K, V after RoPE) of the demo model for the CUDA kernel tests.

    python scripts/capture_qkv.py [--length 4096] [--layers 0,15,29] [--out results/qkv/smollm2_qkv.pt] [--check]

Runs SmolLM2-135M-Instruct densely on CPU over a needle-in-a-haystack prompt (the bundled novel with a passkey
sentence, chat template applied, exactly --length tokens) and records, through the runner's prefill hook, what
the attention of each chosen layer receives: q [1, 9, L, 64], k and v [1, 3, L, 64]. Saves them as bf16 in
{"layers", "q", "k", "v", "meta"} with torch.save. --check then runs the reference SALE at tau = 0.004 on every
captured layer and fails unless the middle one prunes blocks (density < 1: real attention is peaked).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

MAX_MB = 30  # small enough to carry to the device machine with the checkout


def capture(length: int, layers: list[int]) -> dict:
    """Run the demo model once on CPU; return the payload dict (bf16 tensors on CPU)."""
    import transformers

    from sale_cli.eval.niah import DEFAULT_NEEDLE, NiahPromptBuilder, load_haystack
    from sale_cli.runner import load_runner

    runner = load_runner("smollm2-135m", method="dense", device="cpu", dtype="float32")
    bad = [layer for layer in layers if not 0 <= layer < runner.num_layers]
    if bad:
        raise SystemExit(f"--layers {bad}: the model has layers 0..{runner.num_layers - 1}")
    builder = NiahPromptBuilder(runner.tokenizer, load_haystack(), chat_template=runner.apply_chat_template)
    prompt = builder.build(length, depth=0.5)
    found: dict[int, tuple] = {}
    scales: dict[int, float] = {}

    def hook(layer, q, k, v, dense_out, scale):
        if layer in layers:
            found[layer] = tuple(t.detach().to(torch.bfloat16).contiguous().clone() for t in (q, k, v))
            scales[layer] = float(scale)

    with runner.capture(hook):
        runner.prefill(prompt.input_ids)
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise SystemExit(f"the prefill hook never saw layers {missing}")
    meta = {
        "model": runner.model_name, "length": length, "needle": DEFAULT_NEEDLE, "needle_start": prompt.needle_start,
        "scale": scales[layers[0]], "num_layers": runner.num_layers, "dtype": "bfloat16 (model run in float32)",
        "torch": str(torch.__version__), "transformers": str(transformers.__version__),
    }
    return {"layers": layers, "q": [found[x][0] for x in layers], "k": [found[x][1] for x in layers],
            "v": [found[x][2] for x in layers], "meta": meta}


def check(payload: dict, tau: float = 0.004) -> None:
    """Reference SALE density per captured layer; raises SystemExit unless the middle layer's is below 1."""
    from sale_cli.kernels.reference import sale_attention_reference

    densities = []
    for layer, q, k, v in zip(payload["layers"], payload["q"], payload["k"], payload["v"], strict=True):
        taus = torch.full((q.shape[1],), tau)
        _, _, _, density = sale_attention_reference(
            q.float(), k.float(), v.float(), taus, scale=payload["meta"]["scale"], block_q=64, block_k=32,
            sink_tokens=32, local_window=128, estimate="int8", quant_group="per_token", dense=False,
            need_block_map=False, need_lse=False)
        densities.append(density.mean().item())
        per_head = " ".join(f"{x:.3f}" for x in density[0].tolist())
        print(f"check: layer {layer}: reference int8 density at tau={tau}: mean {densities[-1]:.3f} ({per_head})")
    mid = len(densities) // 2
    if not densities[mid] < 1:
        raise SystemExit(f"check failed: layer {payload['layers'][mid]} is dense at tau={tau}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    ap.add_argument("--layers", default="0,15,29", help="comma-separated layer indices (default 0,15,29)")
    ap.add_argument("--out", default="results/qkv/smollm2_qkv.pt")
    ap.add_argument("--check", action="store_true", help="reference SALE at tau=0.004 must prune blocks")
    args = ap.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    if not layers:
        raise SystemExit("--layers: no layer given")

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    payload = capture(args.length, layers)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    torch.save(payload, args.out)
    mb = os.path.getsize(args.out) / 2**20
    q, k = payload["q"][0], payload["k"][0]
    print(f"captured layers {layers}: q {list(q.shape)}, k/v {list(k.shape)}, scale {payload['meta']['scale']:.6g} "
          f"(1/sqrt(d) = {1 / math.sqrt(q.shape[-1]):.6g}); wrote {args.out}: {mb:.1f} MB in "
          f"{time.perf_counter() - start:.1f} s")
    if mb > MAX_MB:
        print(f"warning: {mb:.1f} MB is over {MAX_MB} MB; use fewer --layers or a shorter --length to carry it")
    if args.check:
        t0 = time.perf_counter()
        check(payload)
        print(f"check passed in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
