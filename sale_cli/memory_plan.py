"""A memory plan from a model's config alone: the peak bytes of a prefill per GPU, the prefill chunk and the
placement of the layers over the GPUs, before any weight is loaded.

The model (what `torch.cuda.max_memory_allocated` should show) is, per GPU:

    weights of its layers (+ embedding on the first GPU, final norm and lm head on the last)
  + the KV cache of its layers over the whole length (generation keeps it; chunked prefill needs it)
  + the largest transient of one decoder layer working on one chunk (see ``layer_stage_bytes``)
  + what is held across layers (the embedding output, cos/sin, position ids)

Every term follows the transformers 5.x Llama/Qwen2 forward and this project's runner; the tensors alive at each
step of a layer are listed next to its formula. Whether a plan fits compares that peak plus a headroom
(``headroom_bytes``: allocator fragmentation, lazily loaded kernels, cuBLAS/cuDNN workspaces) with the memory a
process may use on each GPU: the free memory (``torch.cuda.mem_get_info``, which already leaves out the CUDA
context of this process) or a cap given by the user.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

GiB = 1 << 30
MiB = 1 << 20
# Chunk sizes the plan chooses from: powers of two times the query block (64), at most CHUNK_CAP tokens. Larger
# chunks barely speed up prefill (each is already a long matmul) but grow the MLP intermediates linearly.
CHUNK_MIN = 64
CHUNK_CAP = 16384
# Headroom on top of the predicted peak before a plan is said to fit: a fixed part for what the prediction leaves
# out (kernel images loaded lazily, the SALE extension, cuBLAS/cuDNN workspaces: a few hundred MiB measured on
# H100/H200) and a share of the cache and activations for the caching allocator's fragmentation (tensors of
# changing sizes: the KV cache grows by one chunk per layer per step).
HEADROOM_FIXED = 512 * MiB
HEADROOM_FRACTION = 0.10
# kernels/cuda_backend.SELECT_WORKSPACE_BYTES: the selection's quantized Q/K are kept below this many bytes by
# running it over groups of kv heads (repeated here so that the plan never imports the CUDA backend).
SELECT_WORKSPACE_BYTES = 96 * MiB
DTYPE_BYTES = {"float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4}


# ---------------------------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama/Qwen2-style decoder that set its memory."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    max_context: int = 0

    @classmethod
    def from_config(cls, config) -> ModelShape:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        # Qwen2 always has q/k/v biases; Llama only with attention_bias
        qkv_bias = bool(getattr(cfg, "attention_bias", getattr(cfg, "model_type", "") == "qwen2"))
        return cls(num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                   heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)), qkv_bias=qkv_bias,
                   mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
                   max_context=int(getattr(cfg, "max_position_embeddings", 0) or 0))

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype name or torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[name]


# ---------------------------------------------------------------------------------------------- weights and cache


def layer_weight_bytes(s: ModelShape, b: int) -> int:
    """One decoder layer: q/k/v/o projections, gate/up/down, two RMSNorm weights (and biases where present)."""
    attn = s.hidden * (s.q_width + 2 * s.kv_width) + s.q_width * s.hidden
    attn += (s.q_width + 2 * s.kv_width) if s.qkv_bias else 0
    mlp = 3 * s.hidden * s.intermediate + ((2 * s.intermediate + s.hidden) if s.mlp_bias else 0)
    return (attn + mlp + 2 * s.hidden) * b


def embedding_bytes(s: ModelShape, b: int) -> int:
    return s.vocab * s.hidden * b


def head_bytes(s: ModelShape, b: int) -> int:
    """The final norm and the lm head; a head tied to the embedding shares its storage (counted once, there)."""
    return s.hidden * b + (0 if s.tied else s.vocab * s.hidden * b)


def kv_bytes_per_layer(s: ModelShape, b: int, length: int) -> int:
    """K and V of one layer over `length` tokens (GQA: kv heads only, never repeated)."""
    return 2 * s.kv_width * length * b


# ---------------------------------------------------------------------------------------------- one chunk


# How runner.dense_attention runs a dense chunk behind a cached prefix: "split" (kernels.dense.split_cudnn, what its
# chunk probe picked on the H200; the lower-right bias, flash's path, needs less) or "mask" (the explicit
# bool mask: the CPU's path, and a GPU's when neither fused path is usable).
DENSE_CHUNK_PATH = "split"


def dense_workspace_bytes(s: ModelShape, b: int, a: int, length: int, path: str | None = None) -> int:
    """SDPA on `a` queries over `length` keys: its fp32 log-sum-exp, and for a chunk behind a cached prefix
    (a < length) the transient of the chunk path (`path`, default DENSE_CHUNK_PATH):

    - "mask": the bottom-right causal mask that kernels.dense.sdpa builds as a bool [a, length] and that SDPA turns
      into an additive mask of the query dtype (one byte plus `b` bytes per element);
    - "split": the prefix's K and V repeated to every query head (`b` bytes), with the first call's output and
      its fp32 copy; later the fp32 merge of the two outputs (two partial outputs and three temporaries).
    """
    lse = s.heads * a * 4
    if a >= length:
        return lse
    if (path or DENSE_CHUNK_PATH) == "mask":
        return lse + (1 + b) * a * length
    out = s.heads * s.head_dim * a  # elements of one call's output
    prefix = 2 * s.heads * s.head_dim * (length - a) * b
    return lse + max(prefix + (b + 4) * out, 5 * 4 * out)


def sale_workspace_bytes(s: ModelShape, a: int, length: int, *, estimate_bits: int = 8,
                         block_map: bool = False) -> int:
    """The CUDA SALE op on `a` queries over `length` keys, besides q's contiguous copy and the output:
    the quantized Q/K of the selection (capped at SELECT_WORKSPACE_BYTES by grouping kv heads), the int32 bitmap
    [Hq, ceil(a/64), ceil(ceil(length/32)/32)] (twice when the selection runs per head group: the whole bitmap
    and one group's), and the bool block map [Hq, ceil(a/64), ceil(length/32)] when it is materialized
    (FlexAttention's computation pass or a caller asking for it)."""
    groups = s.heads // s.kv_heads
    ib = s.head_dim * estimate_bits // 8
    q_rows, k_rows = math.ceil(a / 64) * 64, math.ceil(length / 64) * 64
    # per kv head: int8/int4 rows of its query heads and of itself, fp32 sq/qm/qkm per query row, block maxima of
    # qm, fp32 sk per key row
    per_kv_head = q_rows * (ib * groups + 12 * groups + 4 * groups // 32) + k_rows * (ib + 4)
    quant = s.kv_heads * per_kv_head
    grouped = quant > SELECT_WORKSPACE_BYTES
    quant = min(quant, max(per_kv_head, SELECT_WORKSPACE_BYTES))
    words = math.ceil(math.ceil(length / 32) / 32)
    bitmap = s.heads * math.ceil(a / 64) * words * 4
    bool_map = s.heads * math.ceil(a / 64) * math.ceil(length / 32) if block_map else 0
    lse = s.heads * a * 4
    return quant + bitmap * (2 if grouped else 1) + bool_map + lse


def layer_stage_bytes(s: ModelShape, b: int, a: int, length: int, method: str, cached: bool = True,
                      block_map: bool = False) -> dict[str, int]:
    """Bytes alive (besides weights and the KV cache) at each step of one decoder layer on a chunk of `a` query
    tokens whose keys reach `length`. `x` is the layer's input (held by the model's loop), `N` a normed copy.

    - norm:   x + the fp32 copy and the fp32 normalized tensor of RMSNorm (8 bytes a token and channel)
    - rope:   x, N, q, k, v and three q-sized temporaries of q*cos + rotate_half(q)*sin
    - update: x, N, rotated q and k, v, and the old V (length - a) next to its concatenated copy (DynamicCache)
    - call:   x, N, rotated q, q's contiguous copy (SALE), the output, the op's workspace; without a cache the
              chunk's own K and V (and SALE's contiguous copies of them)
    - out:    x, N, rotated q, and two of: the output, its [B, L, H*d] contiguous copy, the o_proj result
    - mlp:    x, the residual h1, N2, and three [a, intermediate] tensors: act(gate), up, and their product
    """
    h, qw, kvw, inter = s.hidden, s.q_width, s.kv_width, s.intermediate
    row = a * b  # bytes of one channel over the chunk
    sale = method == "sale"
    workspace = (sale_workspace_bytes(s, a, length, block_map=block_map) if sale
                 else dense_workspace_bytes(s, b, a, length))
    own_kv = 0 if cached else 2 * kvw * row * (2 if sale else 1)
    stages = {
        "norm": h * row + 8 * a * h,
        "rope": (2 * h + 4 * qw + 2 * kvw) * row,
        "call": (2 * h + qw + (qw if sale else 0) + qw) * row + workspace + own_kv,
        "out": (2 * h + qw + max(2 * qw, qw + h)) * row + (0 if cached else 2 * kvw * row),
        "mlp": 3 * h * row + 3 * inter * row,
    }
    if cached:
        stages["update"] = (2 * h + qw + 2 * kvw) * row + kvw * (length - a) * b
    return stages


def held_bytes(s: ModelShape, b: int, a: int, length: int, *, embedding: bool) -> int:
    """Held through a forward on a GPU with layers: cos/sin [a, d], int64 ids and positions over the chunk and
    one int64 vector over the keys (seen on the CPU); on the embedding's GPU also the embedding output (the model
    keeps `inputs_embeds` to the end)."""
    return 2 * a * s.head_dim * b + 3 * a * 8 + 8 * length + (a * s.hidden * b if embedding else 0)


def final_stage_bytes(s: ModelShape, b: int, a: int) -> int:
    """The final RMSNorm over the chunk (its input plus two fp32 tensors) and the last position's logits in the
    model dtype and the runner's fp32 copy (logits_to_keep=1: one row of vocab)."""
    return a * s.hidden * b + 8 * a * s.hidden + s.vocab * (b + 4)


# ---------------------------------------------------------------------------------------------- per GPU


@dataclass
class GpuPlan:
    """What one GPU holds and its predicted peak (bytes)."""

    index: int
    layers: range
    embedding: bool
    head: bool
    weights: int
    kv_cache: int
    activations: int
    budget: int | None = None

    @property
    def peak(self) -> int:
        """Predicted torch.cuda.max_memory_allocated."""
        return self.weights + self.kv_cache + self.activations

    @property
    def need(self) -> int:
        """The peak plus headroom: what must be free for this GPU's share to fit."""
        return self.peak + headroom_bytes(self.kv_cache, self.activations)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.need <= self.budget


def headroom_bytes(kv_cache: int, activations: int) -> int:
    return HEADROOM_FIXED + int(HEADROOM_FRACTION * (kv_cache + activations))


def gpu_plan(s: ModelShape, b: int, index: int, layers: range, *, embedding: bool, head: bool, length: int,
             chunk: int, method: str, cached: bool = True, block_map: bool = False,
             budget: int | None = None) -> GpuPlan:
    """One GPU's share: `layers` (possibly none), the embedding and/or the head, at prompt `length` and `chunk`
    (0 = the whole prompt at once)."""
    a = length if chunk <= 0 else min(chunk, length)
    weights = len(layers) * layer_weight_bytes(s, b) + (embedding_bytes(s, b) if embedding else 0)
    weights += head_bytes(s, b) if head else 0
    kv = len(layers) * kv_bytes_per_layer(s, b, length) if cached else 0
    act = 0
    if len(layers):
        act = max(layer_stage_bytes(s, b, a, length, method, cached, block_map).values())
        act += held_bytes(s, b, a, length, embedding=embedding)
    if head:
        act = max(act, final_stage_bytes(s, b, a) + held_bytes(s, b, a, length, embedding=embedding))
    return GpuPlan(index, layers, embedding, head, weights, kv, act, budget)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Placement, chunk and per-GPU peaks of one model at one length."""

    model: str
    shape: ModelShape
    dtype_bytes: int
    length: int
    method: str
    chunk: int  # 0 = the whole prompt in one forward
    gpus: list[GpuPlan] = field(default_factory=list)
    fits: bool = True
    reason: str = ""

    @property
    def spread(self) -> bool:
        return len(self.gpus) > 1

    @property
    def layers_per_gpu(self) -> list[int]:
        return [len(g.layers) for g in self.gpus]

    @property
    def peak(self) -> int:
        return max(g.peak for g in self.gpus)

    def device_map(self) -> dict[str, int]:
        """An explicit accelerate device_map (Llama/Qwen2 module names) for this placement."""
        first, last = self.gpus[0].index, self.gpus[-1].index
        head_gpu = first if self.shape.tied else last
        dm = {"model.embed_tokens": first, "model.rotary_emb": first}
        for g in self.gpus:
            for layer in g.layers:
                dm[f"model.layers.{layer}"] = g.index
        dm["model.norm"] = head_gpu
        dm["lm_head"] = head_gpu
        return dm


def chunk_candidates(length: int) -> list[int]:
    """0 (whole prompt), then powers of two times 64 from min(CHUNK_CAP, length) down to 64, largest first."""
    sizes, c = [], CHUNK_MIN
    while c <= min(CHUNK_CAP, length) and c < length:
        sizes.append(c)
        c *= 2
    return [0, *reversed(sizes)]


def _split_layers(s: ModelShape, b: int, budgets: list[int], length: int, chunk: int, method: str,
                  cached: bool, block_map: bool) -> list[GpuPlan] | None:
    """Layers over the GPUs in order (embedding on the first, head on the last), as even as each GPU's capacity
    allows; None when they do not fit at this chunk."""
    n_gpu, n = len(budgets), s.num_layers
    tied_head_first = s.tied

    def share(i: int, count: int, start: int = 0) -> GpuPlan:
        head = (i == 0) if tied_head_first else (i == n_gpu - 1)
        return gpu_plan(s, b, i, range(start, start + count), embedding=i == 0, head=head, length=length,
                        chunk=chunk, method=method, cached=cached, block_map=block_map, budget=budgets[i])

    capacity = []
    for i in range(n_gpu):  # the most layers GPU i can hold (monotone in the count)
        lo, hi = 0, n
        if not share(i, 0).fits:
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if share(i, mid).fits else (lo, mid - 1)
        capacity.append(lo)
    if sum(capacity) < n:
        return None
    # water-filling: the smallest level such that min(capacity, level) covers every layer, then trim the
    # surplus from the last GPUs (the first holds the embedding output too)
    level = next(t for t in range(n + 1) if sum(min(c, t) for c in capacity) >= n)
    counts = [min(c, level) for c in capacity]
    surplus = sum(counts) - n  # fewer than the GPUs at the level, since level - 1 would not cover every layer
    for i in reversed(range(n_gpu)):
        if surplus and counts[i] == level:
            counts[i], surplus = counts[i] - 1, surplus - 1
    start, plans = 0, []
    for i, count in enumerate(counts):
        plans.append(share(i, count, start))
        start += count
    return plans


def plan_memory(shape: ModelShape, *, dtype_bytes: int, length: int, method: str = "dense",
                budgets: list[int], chunk: int | None = None, cached: bool = True, block_map: bool = False,
                model: str = "", allow_spread: bool = True) -> MemoryPlan:
    """The plan for a prompt of `length` tokens with `budgets[i]` bytes usable on GPU i.

    One GPU when the model fits it at some chunk, else (`allow_spread`) the layers over every GPU. The chunk is
    `chunk` when given (0 = whole prompt), else the whole prompt when it fits, else the largest candidate that
    fits. `fits` is False (with `reason`) when nothing fits; the plan then shows the smallest chunk on one GPU.
    """
    if method not in ("dense", "sale"):
        raise ValueError(f"method must be 'dense' or 'sale', got {method!r}")
    if length < 1:
        raise ValueError(f"length must be a positive number of tokens, got {length}")
    if not budgets:
        raise ValueError("no GPU memory to plan for (budgets is empty)")
    if chunk is not None and (chunk < 0 or chunk % CHUNK_MIN):
        raise ValueError(f"prefill chunk must be 0 (whole prompt) or a positive multiple of {CHUNK_MIN}, got {chunk}")
    chunks = [chunk] if chunk is not None else chunk_candidates(length)
    kw = dict(length=length, method=method, cached=cached, block_map=block_map)
    layouts = [budgets[:1]] + ([budgets] if allow_spread and len(budgets) > 1 else [])
    for layout in layouts:
        for c in chunks:
            gpus = _split_layers(shape, dtype_bytes, layout, chunk=c, **kw)
            if gpus is not None:
                return MemoryPlan(model, shape, dtype_bytes, length, method, c, gpus)
    # nothing fits: show the last layout tried with its layers spread evenly at the smallest chunk, and how far off
    c, layout = chunks[-1], layouts[-1]
    gpus = even_split(shape, dtype_bytes, layout, chunk=c, **kw)
    worst = max(gpus, key=lambda g: g.need - g.budget)
    where = f"{len(layout)} GPUs" if len(layout) > 1 else "one GPU"
    reason = (f"{model or 'the model'} does not fit {where} at {length} tokens "
              f"({'whole prompt' if c == 0 else f'prefill chunk {c}'}): GPU {worst.index} needs about "
              f"{gib(worst.need)} GiB with headroom, {gib(worst.budget)} GiB usable")
    return MemoryPlan(model, shape, dtype_bytes, length, method, c, gpus, fits=False, reason=reason)


def even_split(s: ModelShape, b: int, budgets: list[int], *, length: int, chunk: int, method: str,
               cached: bool = True, block_map: bool = False) -> list[GpuPlan]:
    """The layers in equal runs over the GPUs (the first ones take the remainder), whether or not they fit."""
    n_gpu, start, plans = len(budgets), 0, []
    for i in range(n_gpu):
        count = s.num_layers // n_gpu + (1 if i < s.num_layers % n_gpu else 0)
        head = (i == 0) if s.tied else (i == n_gpu - 1)
        plans.append(gpu_plan(s, b, i, range(start, start + count), embedding=i == 0, head=head, length=length,
                              chunk=chunk, method=method, cached=cached, block_map=block_map, budget=budgets[i]))
        start += count
    return plans


def gib(n: int) -> str:
    return f"{n / GiB:.1f}"


# ---------------------------------------------------------------------------------------------- GPUs and configs


def gpu_budgets(gpus: int | None = None, gpu_memory_gib: float | None = None) -> list[int]:
    """Usable bytes per GPU: `gpu_memory_gib` on each of `gpus` GPUs (default: the visible count, at least 1),
    else the free memory of each visible GPU. ValueError when neither is known."""
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if gpu_memory_gib is not None:
        if not gpu_memory_gib > 0:
            raise ValueError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib}")
        return [int(gpu_memory_gib * GiB)] * (gpus or max(1, visible_gpus()))
    free = free_memory()
    if not free:
        raise ValueError("no CUDA GPU is visible: pass --gpu-memory-gib (and --gpus) to plan for GPUs elsewhere")
    if gpus is not None:
        if gpus > len(free):
            raise ValueError(f"--gpus {gpus}: only {len(free)} GPUs are visible; add --gpu-memory-gib to plan "
                             "for GPUs elsewhere")
        free = free[:gpus]
    return free


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_memory() -> list[int]:
    """Free bytes of each visible GPU (empty without CUDA)."""
    import torch

    return [torch.cuda.mem_get_info(i)[0] for i in range(visible_gpus())]


def load_config(model: str):
    """The transformers config of an alias, .gguf file, model directory or cached HF id (no weights read)."""
    from transformers import AutoConfig

    from sale_cli.runner import _source

    source, extra, _ = _source(model)
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except OSError as exc:
        raise ValueError(f"model: no config for {model!r} (not a local directory or file, not in the Hugging Face "
                         f"cache, and the hub was not reachable): {exc}") from exc


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# ---------------------------------------------------------------------------------------------- measured peaks


def reset_peaks() -> None:
    """Reset the peak-memory statistics of every visible GPU (no-op without CUDA)."""
    import torch

    for i in range(visible_gpus()):
        torch.cuda.reset_peak_memory_stats(i)


def measured_peaks() -> list[dict]:
    """Per visible GPU since the last reset: peak allocated and reserved MiB, and the total (empty without CUDA)."""
    import torch

    rows = []
    for i in range(visible_gpus()):
        rows.append({"gpu": i, "peak_allocated_mib": round(torch.cuda.max_memory_allocated(i) / MiB, 1),
                     "peak_reserved_mib": round(torch.cuda.max_memory_reserved(i) / MiB, 1),
                     "total_mib": round(torch.cuda.get_device_properties(i).total_memory / MiB, 1)})
    return rows


def oom_message(tokens: int | None, chunk: int | None, gpus_in_use: int, where: str = "") -> str:
    """One line after torch.cuda.OutOfMemoryError: the peak per GPU, the chunk and what to change."""
    peaks = measured_peaks()
    peak = ", ".join(f"GPU {p['gpu']} {p['peak_allocated_mib'] / 1024:.1f}/{p['total_mib'] / 1024:.0f} GiB"
                     for p in peaks) or "unknown"
    chunk_text = "whole prompt" if not chunk else f"{chunk} tokens"
    more = "" if gpus_in_use >= max(1, visible_gpus()) else "more GPUs (one process, layers spread), "
    return (f"out of GPU memory{' ' + where if where else ''} at {tokens} prompt tokens (peak {peak}; prefill chunk "
            f"{chunk_text}): try a smaller --prefill-chunk, {more}or shorter prompts (--max-length, --length); "
            "`sale plan MODEL --length N` predicts what fits; finished predictions are kept, rerun to resume")


# ---------------------------------------------------------------------------------------------- placement at load


@dataclass
class Placement:
    """What load_runner does with a plan: an explicit device_map (None: one device) and the line saying so."""

    plan: MemoryPlan
    device_map: dict[str, int] | None = None
    note: str | None = None


def decide_placement(shape: ModelShape, *, dtype_bytes: int, length: int, method: str, budgets: list[int],
                     world: int = 1, model: str = "") -> Placement:
    """Placement of a model about to be loaded on GPUs with `budgets` usable bytes (under torchrun: this rank's
    GPU only).

    - One process, several GPUs: the model stays on one GPU when it fits there at `length` (with chunked prefill),
      else its layers are spread over every GPU (the even split when even that is predicted not to fit: the
      estimate may be pessimistic, and it is the best chance).
    - Under torchrun (`world` > 1) every rank holds a whole model: UserError when it cannot fit one GPU.
    """
    from sale_cli.errors import UserError

    one = plan_memory(shape, dtype_bytes=dtype_bytes, length=length, method=method, budgets=budgets[:1],
                      model=model, allow_spread=False)
    if one.fits:
        return Placement(one)
    if world > 1:
        raise UserError(f"{one.reason}. Under torchrun every process holds the whole model: run one process "
                        "instead (no torchrun, NPROC=1) and the layers are spread over the GPUs, or pass a shorter "
                        "--max-length")
    if len(budgets) == 1:
        return Placement(one, note=f"warning: {one.reason}; trying anyway")
    spread = plan_memory(shape, dtype_bytes=dtype_bytes, length=length, method=method, budgets=budgets,
                         model=model)
    layers = "/".join(str(n) for n in spread.layers_per_gpu)
    note = (f"{model or 'the model'} needs about {gib(one.gpus[0].need)} GiB at {length} tokens, more than one "
            f"GPU's {gib(budgets[0])} GiB: its layers are spread over {len(spread.gpus)} GPUs ({layers})")
    if not spread.fits:
        note += f" (warning: {spread.reason})"
    return Placement(spread, spread.device_map(), note)


def placement_for_load(config, *, dtype_bytes: int, length: int | None, method: str, device: str,
                       model: str = "") -> Placement | None:
    """decide_placement for load_runner on the visible GPUs: all of them in one process, this rank's under
    torchrun; None when `device` is not a CUDA device or no length is known."""
    if not device.startswith("cuda") or not visible_gpus():
        return None
    shape = ModelShape.from_config(config)
    length = length or shape.max_context
    if not length:
        return None
    free = free_memory()
    world = world_size()
    if world > 1 or ":" in device:  # one given GPU: plan for it alone
        index = int(device.split(":")[1]) if ":" in device else 0
        free = free[index:index + 1]
    return decide_placement(shape, dtype_bytes=dtype_bytes, length=length, method=method, budgets=free,
                            world=world, model=model)


def choose_chunk(config, *, dtype_bytes: int, length: int, method: str, budgets: list[int] | None = None) -> int:
    """The prefill chunk for a model on one GPU (for runner.default_prefill_chunk): the plan's choice with
    `budgets` (default: the first visible GPU's free memory); 0 (whole prompt) without a GPU; CHUNK_CAP when
    nothing fits (the out-of-memory message then says what to change). A model spread over GPUs by load_runner
    has its chunk in ``runner.memory_plan.chunk``."""
    if budgets is None:
        budgets = free_memory()[:1]
    if not budgets:
        return 0
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    plan = plan_memory(shape, dtype_bytes=dtype_bytes, length=length, method=method, budgets=budgets[:1],
                       allow_spread=False)
    if plan.fits:
        return plan.chunk
    return CHUNK_CAP if length > CHUNK_CAP else 0
