"""Per-head threshold files: safetensors with ``thresholds`` float32 [num_layers, num_heads] and metadata.

The metadata records the prefill chunk the calibration ran with (``prefill_chunk``, tokens, 0 = whole
prompt); files written before chunking existed have none.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sale_cli import __version__
from sale_cli.options import SaleOptions

REQUIRED_METADATA = ("model", "theta", "tau0", "samples", "tokens", "estimate", "quant_group", "block_q", "block_k",
                     "local_window", "sink_tokens", "prefill_chunk", "version")


def default_path(results_dir: str | os.PathLike, model_name: str, theta: float) -> Path:
    """results/calibration/<model-name>/theta_<theta>.safetensors"""
    return Path(results_dir) / "calibration" / model_name / f"theta_{theta:g}.safetensors"


def save(path: str | os.PathLike, thresholds: torch.Tensor, *, model: str, theta: float, tau0: float, samples: int,
         tokens: int, options: SaleOptions, prefill_chunk: int = 0, extra: dict[str, str] | None = None,
         density: torch.Tensor | None = None) -> Path:
    """Write the file atomically (temporary file, then rename); ``density`` [num_layers, num_heads], the
    calibrated density of each head, is stored beside the thresholds when given."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "theta": f"{theta:g}", "tau0": f"{tau0:g}", "samples": str(samples),
            "tokens": str(tokens), "prefill_chunk": str(prefill_chunk), "version": __version__, **options.metadata(), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"thresholds": thresholds.detach().float().cpu().contiguous()}
    if density is not None:
        tensors["density"] = density.detach().float().cpu().contiguous()
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load(path: str | os.PathLike, *, num_layers: int | None = None, num_heads: int | None = None,
         options: SaleOptions | None = None, model: str | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """Read (thresholds, metadata); raise ValueError when the file does not fit the model or the run's options."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"thresholds file {path} does not exist; create it with `sale calibrate MODEL --theta X`")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "thresholds" not in f.keys():
                raise ValueError(f"{path} holds no tensor named 'thresholds'")
            tau = f.get_tensor("thresholds")
            meta = f.metadata() or {}
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable .safetensors file ({exc}); recreate it with `sale calibrate`") from exc
    if tau.dim() != 2 or tau.dtype != torch.float32:
        raise ValueError(f"{path}: 'thresholds' must be float32 [num_layers, num_heads], got {tau.dtype} {tuple(tau.shape)}")
    if not torch.isfinite(tau).all() or (tau < 0).any():
        raise ValueError(f"{path}: thresholds must be finite and >= 0 (found inf, NaN or a negative value)")
    expected = (num_layers, num_heads)
    if any(e is not None and e != got for e, got in zip(expected, tau.shape, strict=True)):
        raise ValueError(f"{path}: thresholds have shape {tuple(tau.shape)} but the model has "
                         f"{num_layers} layers x {num_heads} query heads")
    if model is not None and meta.get("model") not in (None, model):
        raise ValueError(f"{path} was calibrated for model {meta.get('model')!r}, not {model!r}")
    if options is not None:
        wrong = {k: (v, meta[k]) for k, v in options.metadata().items() if k in meta and meta[k] != v}
        if wrong:
            detail = ", ".join(f"{k}={run} (file: {file})" for k, (run, file) in wrong.items())
            raise ValueError(f"{path} was calibrated with other op options than this run: {detail}. "
                             "Recalibrate or pass the file's options.")
    return tau, meta


def load_density(path: str | os.PathLike) -> torch.Tensor | None:
    """The calibrated density [num_layers, num_heads] stored with the thresholds, None in older files."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("density") if "density" in f.keys() else None


def recorded_chunk(meta: dict[str, str]) -> int | None:
    """The prefill chunk a file was calibrated with (0 = whole prompt), None when the file does not say."""
    value = meta.get("prefill_chunk")
    return None if value is None else int(value)


def chunk_mismatch(path, file_chunk: int | None, run_chunk: int) -> str | None:
    """One line for a run whose prefill chunk differs from its thresholds file's, else None.

    A warning rather than an error: with another chunking the op selects over the same keys and only the
    smoothing means change, so the thresholds still fit; but the calibrated error bound was measured with the
    file's chunking.
    """
    if file_chunk is None or file_chunk == run_chunk:
        return None
    def name(chunk: int) -> str:
        return f"{chunk}" + (" (whole prompt)" if chunk == 0 else "")
    return (f"warning: {path} was calibrated with --prefill-chunk {name(file_chunk)} but this run uses "
            f"--prefill-chunk {name(run_chunk)}; pass --prefill-chunk {file_chunk} to match it, or recalibrate")
