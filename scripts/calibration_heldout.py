"""Issue 20's measurement: calibrate the demo model at 8K tokens with the old rule (kv only, 2 samples, no margin)
and the new default (mix, margin 0.25), check each on held-out kv/prose/code samples, and compare passkey answers
against dense. One model load for everything (GPU or CPU).

Usage: python scripts/calibration_heldout.py --out DIR [--tokens 8192] [--thetas 0.4,0.1] [--validate 3]
       [--device cuda] [--variants old,new3,new6] [--dense-above D (1 = no dense-heads rule)]
Writes DIR/<variant>_theta_<theta>.safetensors, their .check.json reports and DIR/summary.json; prints tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from sale_cli import calibrate as calib
from sale_cli.data.passkey import found_key, passkey_prompt
from sale_cli.runner import load_runner

VARIANTS = {  # name: (data, samples, margin)
    "old": ("kv", 2, 0.0),
    "new3": ("mix", 3, calib.MARGIN),
    "new6": ("mix", 6, calib.MARGIN),
}


def passkeys(runner, lengths: list[int], seeds: int) -> list[dict]:
    count = lambda t: len(runner.tokenizer(t).input_ids)  # noqa: E731
    rows = []
    for length in lengths:
        for seed in range(seeds):
            prompt, key = passkey_prompt(seed, length, count)
            res = runner.generate(runner.tokenizer(prompt).input_ids, max_new_tokens=8)
            rows.append(dict(tokens=res.input_tokens, seed=seed, key=key, output=res.text.strip(),
                             correct=found_key(res.text, key), density=res.density))
    return rows


def markdown(summary: dict) -> str:
    """One row per (theta, variant, held-out kind) of a summary.json, then the passkey answers."""
    lines = ["| theta | calibration | held-out kind | heads below theta | worst head (layer.head): error | worst / theta "
             "| mean density | dense heads | target |", "|---|---|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        name = f"{run['data']}, {run['samples']} samples, margin {run['margin']:g}"
        for kind, r in run["kinds"].items():
            w = r["worst"][0]
            lines.append(f"| {run['theta']:g} | {name} | {kind} | {100 * r['heads_below_theta']:.1f}% | "
                         f"{w['layer']}.{w['head']}: {r['max_error']:.3f} | {r['max_error_over_theta']:.2f}x | "
                         f"{r['mean_density']:.3f} | {run['dense_heads']} | {'met' if r['meets_target'] else 'missed'} |")
    lines += ["", "| thresholds | passkey correct | answers identical to dense |", "|---|---|---|"]
    dense = summary["passkey_dense"]
    lines.append(f"| dense | {sum(r['correct'] for r in dense)}/{len(dense)} | - |")
    for run in summary["runs"]:
        keys = run["passkey"]
        same = sum(a["output"] == b["output"] for a, b in zip(dense, keys, strict=True))
        lines.append(f"| theta {run['theta']:g}, {run['variant']} | {sum(r['correct'] for r in keys)}/{len(keys)} | "
                     f"{same}/{len(keys)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, help="print the Markdown tables of this summary.json and stop")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--thetas", default="0.4,0.1")
    ap.add_argument("--validate", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="old,new3,new6")
    ap.add_argument("--passkey-lengths", default="4096,8000")
    ap.add_argument("--passkey-seeds", type=int, default=3)
    ap.add_argument("--dense-above", type=float, default=None,
                    help="calibration's dense-heads rule (default: the GPU's break-even; 1 = off)")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    runner = load_runner(args.model, device=args.device)
    console.print(f"model {runner.model_name} on {runner.device}, dtype {runner.dtype}, chunk {runner.prefill_chunk}")
    lengths = [int(x) for x in args.passkey_lengths.split(",")]
    summary: dict = {"tokens": args.tokens, "validate": args.validate, "device": str(runner.device),
                     "dense_above": args.dense_above, "runs": []}
    runner.set_method("dense")
    summary["passkey_dense"] = passkeys(runner, lengths, args.passkey_seeds)
    for theta in [float(x) for x in args.thetas.split(",")]:
        for name in args.variants.split(","):
            data, samples, margin = VARIANTS[name]
            path = args.out / f"{name}_theta_{theta:g}.safetensors"
            t0 = time.time()
            runner.set_method("dense")
            tau, _ = calib.calibrate(runner, theta, samples=samples, tokens=args.tokens, out=path, data=data,
                                     margin=margin, dense_above=args.dense_above, console=console,
                                     progress=False)
            t1 = time.time()
            report = calib.check(runner, tau, theta, tokens=args.tokens, per_kind=args.validate,
                                 thresholds_path=path, console=console, progress=False)
            t2 = time.time()
            console.print(calib.check_table(report, f"{name} ({data}, {samples} samples, margin {margin:g}), "
                                                    f"theta {theta:g}, {args.tokens} tokens"))
            runner.set_method("sale", path)
            keys = passkeys(runner, lengths, args.passkey_seeds)
            summary["runs"].append(dict(
                variant=name, theta=theta, data=data, samples=samples, margin=margin, thresholds=str(path),
                mean_tau=tau.mean().item(), dense_heads=int((tau == 0).sum()), calibrate_s=t1 - t0, check_s=t2 - t1,
                kinds={k: {f: r[f] for f in ("heads_below_theta", "heads_below_theta_every_sample", "max_error",
                                              "max_error_over_theta", "mean_density", "meets_target")}
                       | {"worst": r["worst_heads"][:3]} for k, r in report["kinds"].items()},
                passkey=keys))
            same = sum(a["output"] == b["output"] for a, b in zip(summary["passkey_dense"], keys, strict=True))
            console.print(f"passkey: {sum(r['correct'] for r in keys)}/{len(keys)} correct, {same}/{len(keys)} "
                          f"answers identical to dense; calibrate {t1 - t0:.0f} s, check {t2 - t1:.0f} s")
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    dense = summary["passkey_dense"]
    console.print(f"dense passkey: {sum(r['correct'] for r in dense)}/{len(dense)} correct: "
                  + "; ".join(f"{r['tokens']}:{r['output'][:12]!r}" for r in dense))


if __name__ == "__main__":
    main()
