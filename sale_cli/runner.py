"""The model runner: the only place that loads a model and runs it.

Attention goes through transformers' attention-function registry: the runner registers the "sale"
implementation, which routes prefill calls (more than one query token) to ``sale_attention`` with the
layer's thresholds when the method is "sale", and everything else to the fastest exact dense attention.
Each call can be timed (CUDA events on GPU, wall clock on CPU) and its block density recorded.

Prompts go through the model in chunks of ``Runner.prefill_chunk`` tokens (0 = the whole prompt at once) with
a KV cache: each chunk's attention call has Lq = the chunk's rows over Lk = all positions so far. Only the
last position's logits are ever computed.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from sale_cli import demo_model
from sale_cli import thresholds as thresholds_io
from sale_cli.errors import ModelLoadError
from sale_cli.kernels import sale_attention
from sale_cli.kernels.constants import BLOCK_Q
from sale_cli.kernels.dense import sdpa as _sdpa
from sale_cli.kernels.reference import visible_block_pairs
from sale_cli.options import SaleOptions

METHODS = ("dense", "sale")
ATTN_NAME = "sale"
CHUNK_MULTIPLE = BLOCK_Q  # prefill chunks are whole query blocks of the default block_q
_log = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    prefill_ms: float
    attn_ms: float
    density: float
    density_per_layer: list[list[float]]
    logits_last: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    input_tokens: int
    prefill_ms: float
    attn_ms: float
    density: float
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# dense attention: the fastest exact SDPA backend of this torch, probed once per shape (the calls: kernels/dense.py)


_DENSE_CHOICE: dict[tuple, tuple[str, bool]] = {}


def _time_ms(fn, device) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch explains each backend it cannot use
        for _ in range(2):
            fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 200


def _probe(hq: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """Time cuDNN, flash and memory-efficient SDPA on a 4K causal prefill; return (backend, repeat_kv)."""
    key = (hq, hkv, d, dtype, device)
    if key in _DENSE_CHOICE:
        return _DENSE_CHOICE[key]
    if device.type != "cuda":
        _DENSE_CHOICE[key] = ("", False)
        return _DENSE_CHOICE[key]
    q = torch.randn(1, hq, 4096, d, device=device, dtype=dtype)
    k = torch.randn(1, hkv, 4096, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    best, best_ms = None, math.inf
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        for repeat_kv in (False, True):
            try:
                ms = _time_ms(lambda b=backend, r=repeat_kv: _sdpa(q, k, v, None, b, r), device)
            except RuntimeError:
                continue
            if ms < best_ms:
                best, best_ms = (backend, repeat_kv), ms
    _DENSE_CHOICE[key] = best or ("", False)
    return _DENSE_CHOICE[key]


def _probe_chunk(hq: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """The fastest correct bottom-right variant for a chunk (2K queries over 16K keys): torch's lower-right
    causal bias (with or without repeated K/V), two cuDNN calls merged (``dense.split_cudnn``) or an explicit mask;
    each checked against the mask's output, since a fused kernel may take the bias but mishandle a GQA layout."""
    key = ("chunk", hq, hkv, d, dtype, device)
    if key in _DENSE_CHOICE:
        return _DENSE_CHOICE[key]
    if device.type != "cuda":
        _DENSE_CHOICE[key] = ("MASK", False)
        return _DENSE_CHOICE[key]
    q = torch.randn(1, hq, 2048, d, device=device, dtype=dtype)
    k = torch.randn(1, hkv, 16384, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    want = _sdpa(q, k, v, None, "MASK", False).float()
    best, best_ms = ("MASK", False), _time_ms(lambda: _sdpa(q, k, v, None, "MASK", False), device)
    for variant, repeat_kv in (("LOWER_RIGHT", False), ("LOWER_RIGHT", True), ("SPLIT", False)):
        try:
            got = _sdpa(q, k, v, None, variant, repeat_kv).float()
            if (got - want).abs().max().item() > 2e-2:
                continue
            ms = _time_ms(lambda b=variant, r=repeat_kv: _sdpa(q, k, v, None, b, r), device)
        except (RuntimeError, AttributeError, TypeError):  # a backend or the private op not usable here
            continue
        if ms < best_ms:
            best, best_ms = (variant, repeat_kv), ms
    _DENSE_CHOICE[key] = best
    return best


def dense_attention(q, k, v, scale):
    """Exact causal attention (queries = the last Lq positions) with the fastest probed SDPA path for this
    shape and device: the square-prefill probe for Lq == Lk, the chunk probe for 1 < Lq < Lk."""
    probe = _probe_chunk if 1 < q.shape[2] < k.shape[2] else _probe
    backend, repeat_kv = probe(q.shape[1], k.shape[1], q.shape[-1], q.dtype, q.device)
    return _sdpa(q, k, v, scale, backend or None, repeat_kv)


def _backend_label(choice: tuple[str, bool], device: torch.device) -> str:
    backend, repeat_kv = choice
    if not backend:
        return "sdpa:default" if device.type == "cuda" else f"sdpa:{device.type}"
    name = {"CUDNN_ATTENTION": "cudnn", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient"}[backend]
    return f"sdpa:{name}" + ("+repeat_kv" if repeat_kv else "")


def probe_dense_backend(hq: int = 32, hkv: int = 8, d: int = 128) -> str:
    """Which dense attention this machine would use (Llama-3.1-8B shapes by default)."""
    if not torch.cuda.is_available():
        return "sdpa:cpu"
    dev = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _backend_label(_probe(hq, hkv, d, dtype, dev), dev)


# ----------------------------------------------------------------------------------------------------------------
# the registered attention function and its per-model state


class AttentionState:
    """What the registered attention function needs from its runner, attached to every attention module."""

    def __init__(self, options: SaleOptions):
        self.method = "dense"
        self.options = options
        self.thresholds: torch.Tensor | None = None  # [num_layers, Hq] on CPU
        self._per_device: dict[tuple[int, str], torch.Tensor] = {}
        self.recording = False
        self.prefilling = False  # set by the runner around a prompt's chunks: a 1-token last chunk is prefill
        self.stage_timings = False  # ask the kernel for quant/select/compute times (it synchronizes per call)
        self.records: list[tuple] = []
        # calibration: called as hook(layer_idx, q, k, v, dense_out, scale) on prefill calls (once per chunk:
        # q holds the chunk's rows, k and v every position so far)
        self.hook: Callable | None = None

    def set_thresholds(self, tau: torch.Tensor | None):
        self.thresholds = None if tau is None else tau.float().cpu()
        self._per_device.clear()

    def layer_tau(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, str(device))
        if key not in self._per_device:
            self._per_device[key] = self.thresholds[layer].to(device)
        return self._per_device[key]


def _attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function "sale": returns ([B, L, H, d], None)."""
    state: AttentionState | None = getattr(module, "sale_state", None)
    if state is None:
        raise RuntimeError("attention implementation 'sale' is only usable on models loaded through sale_cli.runner")
    if dropout:
        raise ValueError("the 'sale' attention does not support dropout (inference only)")
    layer = module.layer_idx
    prefill = state.prefilling or query.shape[2] > 1
    timed = state.recording and prefill
    if timed:
        start = _now(query.device)
    density, timings = None, None
    if prefill and state.method == "sale":
        res = sale_attention(query, key, value, state.layer_tau(layer, query.device), scale=scaling,
                             **state.options.op_kwargs(), return_density=True,
                             return_timings=state.stage_timings and timed)
        out, density, timings = res.out, res.density.mean(0), res.timings
    else:
        out = dense_attention(query, key, value, scaling)
        if prefill and state.hook is not None:
            state.hook(layer, query, key, value, out, scaling)
    if timed:
        state.records.append((layer, start, _now(query.device), density, timings, query.shape[2], key.shape[2]))
    return out.transpose(1, 2).contiguous(), None


def _now(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


def _elapsed_ms(start, end) -> float:
    if isinstance(start, float):
        return (end - start) * 1000
    return start.elapsed_time(end)


def register_attention():
    """Register the "sale" attention function with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention_forward)


# ----------------------------------------------------------------------------------------------------------------
# the prefill chunk


def check_prefill_chunk(chunk, max_context: int = 0) -> int:
    """``chunk`` if it is 0 (whole prompt) or a positive multiple of 64 within ``max_context`` (0: unknown);
    else ValueError naming --prefill-chunk."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0 or chunk % CHUNK_MULTIPLE:
        raise ValueError(f"--prefill-chunk must be 0 (whole prompt) or a positive multiple of {CHUNK_MULTIPLE} "
                         f"tokens, got {chunk!r}")
    if max_context and chunk > max_context:
        raise ValueError(f"--prefill-chunk {chunk} exceeds the model's context of {max_context} tokens; use at most "
                         f"{max_context // CHUNK_MULTIPLE * CHUNK_MULTIPLE}, or 0 for the whole prompt")
    return chunk


def default_prefill_chunk(config, dtype: torch.dtype, devices: list[torch.device]) -> int:
    """The chunk a run uses when --prefill-chunk is not given (a first rule; the memory plan refines it).

    0 (whole prompt) without a GPU. On GPUs: the largest power of two >= 1024 whose per-token transients of one
    decoder layer (MLP intermediates, q/k/v, hidden states) fit an eighth of the smallest free memory among
    ``devices``; 0 when the model's whole context fits that way.
    """
    gpus = [d for d in devices if d.type == "cuda"]
    if not gpus:
        return 0
    free = min(torch.cuda.mem_get_info(d)[0] for d in gpus)
    hidden = config.hidden_size
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, "intermediate_size", 4 * hidden)
    per_token = torch.finfo(dtype).bits // 8 * (3 * inter + 4 * hidden + (heads + 2 * kv_heads) * head_dim)
    fits = free // 8 // per_token
    max_context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if max_context <= 1024 or fits >= max_context:
        return 0
    chunk = 1024
    while chunk * 2 <= min(fits, max_context):
        chunk *= 2
    return chunk


def resolve_prefill_chunk(requested: int | None, *, config, dtype: torch.dtype, devices: list[torch.device]) -> int:
    """The run's prefill chunk: ``requested`` (--prefill-chunk) checked against the model's context, or, when
    None, :func:`default_prefill_chunk`."""
    if requested is None:
        return default_prefill_chunk(config, dtype, devices)
    return check_prefill_chunk(requested, int(getattr(config, "max_position_embeddings", 0) or 0))


# ----------------------------------------------------------------------------------------------------------------
# loading


def _resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


def check_device(device: str) -> str:
    """The device to load onto ("auto" resolved); ValueError naming --device for one this machine lacks."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {device}: no usable CUDA GPU here (torch {torch.__version__}, {build}); "
                             "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_hub_id(model: str) -> None:
    """Fail fast on a hub id that is neither cached nor known to the hub (one quick query, no retries)."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if huggingface_hub.try_to_load_from_cache(model, "config.json") is not None:
        return
    try:
        huggingface_hub.model_info(model, timeout=10)
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"model: no Hugging Face model {model!r} (check the spelling; a private or gated "
                             "model needs `hf auth login`), and no local folder of that name") from exc
    except HfHubHTTPError:
        return  # another hub answer: from_pretrained reports it
    except Exception as exc:  # offline mode, DNS, timeouts: the hub is not reachable
        raise ModelLoadError(f"model: {model!r} is not in the Hugging Face cache and the hub is not reachable "
                             f"({type(exc).__name__}: {str(exc)[:120]}); download it first (hf download {model}) "
                             "or pass a local folder") from exc


def _source(model: str) -> tuple[str, dict, str]:
    """(path or id for from_pretrained, extra kwargs, short model name) for an alias, .gguf, directory or HF id."""
    if model == demo_model.ALIAS:
        gguf = demo_model.fetch()
        return str(gguf.parent), {"gguf_file": gguf.name}, demo_model.NAME
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model: GGUF file {path} does not exist")
        name = demo_model.NAME if path.name == demo_model.GGUF else path.stem
        return str(path.parent), {"gguf_file": path.name}, name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: directory {path} has no config.json (expected a Hugging Face model folder)")
        return str(path), {}, path.resolve().name
    if path.exists() or model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise ValueError(f"model: {model!r} is neither a model directory, a .gguf file, the alias "
                         f"{demo_model.ALIAS!r}, nor a Hugging Face id (owner/name)")
    check_hub_id(model)
    return model, {}, model.split("/")[-1]


def model_name(model: str) -> str:
    """The short name load_runner gives ``model`` (it names the calibration folder), without fetching or loading."""
    if model == demo_model.ALIAS:
        return demo_model.NAME
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        return demo_model.NAME if path.name == demo_model.GGUF else path.stem
    if path.is_dir():
        return path.resolve().name
    return model.split("/")[-1]


def load_runner(model: str = demo_model.ALIAS, *, method: str = "dense", thresholds: str | os.PathLike | None = None,
                theta: float | None = None, results_dir: str | os.PathLike = "results",
                options: SaleOptions | None = None, dtype: str | torch.dtype = "auto", device: str = "auto",
                device_map: str | None = None, random_weights: bool = False,
                prefill_chunk: int | None = None, length: int | None = None) -> Runner:
    """Load a model (alias, HF id, local directory or .gguf) with the "sale" attention registered.

    ``random_weights`` builds the architecture from the config alone (for timing without a checkpoint).
    Without ``options``, a thresholds file's recorded op options are adopted. ``prefill_chunk``: tokens per
    prefill chunk (a multiple of 64, 0 = whole prompt); None takes the memory plan's chunk (CUDA), else
    :func:`resolve_prefill_chunk`'s default.
    On CUDA, ``runner.memory_plan`` is the memory plan at ``length`` tokens (default: the model's context): with
    several visible GPUs, one process and no ``device_map``, a model that does not fit one GPU at that length is
    spread over them; under torchrun such a model is a UserError before any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    if device_map not in (None, "auto"):
        raise ValueError(f"device_map must be None or 'auto', got {device_map!r}")
    if prefill_chunk is not None:
        check_prefill_chunk(prefill_chunk)  # before loading weights; the context limit is checked after
    torch_dtype = _resolve_dtype(dtype, device if device_map is None else "cuda")
    source, extra, name = _source(model)
    register_attention()
    if random_weights and device_map is not None:
        raise ValueError("random_weights builds the model on one device; drop device_map")
    try:
        with demo_model.quiet_loading("gguf_file" in extra):  # the GGUF conversion bar would print every time
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            placement = None
            if device_map is None:
                placement = _placement(AutoConfig.from_pretrained(source, **extra), torch_dtype, length, method,
                                       device, name, random_weights)
                device_map = placement.device_map if placement else None
            if random_weights:
                config = AutoConfig.from_pretrained(source, **extra)
                with torch.device(device):
                    loaded = AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                              attn_implementation=ATTN_NAME)
            else:
                loaded = AutoModelForCausalLM.from_pretrained(
                    source, dtype=torch_dtype, attn_implementation=ATTN_NAME,
                    device_map=device_map if device_map else None, **extra)
    except (OSError, ValueError, ImportError, SafetensorError) as exc:  # ImportError: GGUF without gguf
        if isinstance(exc, OSError) and not Path(source).exists():  # a hub id
            raise ModelLoadError(
                f"could not load model {model!r}: it is neither a local directory nor in the Hugging Face cache, "
                f"and the hub was not reachable or refused it ({exc}). Download it first (hf download {model}) or "
                "pass a local directory.") from exc
        raise ModelLoadError(f"could not load model {model!r} ({type(exc).__name__}: {exc}); check that it is a "
                             "complete Hugging Face model folder or GGUF file") from exc
    if device_map is None:
        loaded.to(device)
    loaded.eval()
    runner = Runner(loaded, tokenizer, name, options or SaleOptions())
    runner.memory_plan = placement.plan if placement else None
    runner.adopt_file_options = options is None
    if prefill_chunk is None and runner.memory_plan is not None:
        prefill_chunk = runner.memory_plan.chunk  # the chunk that fits at `length`
    runner.set_prefill_chunk(resolve_prefill_chunk(prefill_chunk, config=loaded.config, dtype=runner.dtype,
                                                   devices=runner.devices))
    runner.set_method(method, thresholds, theta=theta, results_dir=results_dir)
    return runner


def _placement(config, torch_dtype, length, method, device, name, random_weights):
    """The memory plan's placement on CUDA (None elsewhere); says in one line when the layers are spread."""
    from sale_cli import memory_plan

    placement = memory_plan.placement_for_load(config, dtype_bytes=torch_dtype.itemsize, length=length,
                                               method=method, device=device, model=name)
    if placement is not None and placement.device_map is not None and random_weights:
        placement.device_map, placement.note = None, "random weights: built on one GPU although " + placement.note
    if placement is not None and placement.note:
        print(f"sale: {placement.note}", file=sys.stderr)
    return placement


# ----------------------------------------------------------------------------------------------------------------
# running


class Runner:
    """A loaded model with the "sale" attention; prefill and greedy generation with timing and density."""

    def __init__(self, model, tokenizer, model_name: str, options: SaleOptions):
        cfg = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.options = options
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        self.state = AttentionState(options)
        attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
        if len(attn_modules) != self.num_layers:
            raise ValueError(f"model {model_name}: found {len(attn_modules)} attention modules for "
                             f"{self.num_layers} layers; only Llama/Qwen2-style decoder models are supported")
        for m in attn_modules:
            m.sale_state = self.state
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._shape = (cfg.num_attention_heads, cfg.num_key_value_heads, head_dim)
        self.thresholds_path: Path | None = None
        self._file_chunk: int | None = None  # the prefill chunk recorded in the loaded thresholds file
        self._warned: set[str] = set()
        self.adopt_file_options = False
        self.prefill_chunk = 0  # tokens per prefill chunk, 0 = whole prompt; set through set_prefill_chunk

    def set_prefill_chunk(self, chunk: int) -> None:
        """Tokens per prefill chunk (a multiple of 64 within the model's context; 0 = whole prompt)."""
        self.prefill_chunk = check_prefill_chunk(chunk, self.max_context)
        self._warn_chunk_mismatch()

    def chunk_bounds(self, length: int) -> list[tuple[int, int]]:
        """[start, end) of each prefill chunk of a ``length``-token prompt."""
        step = self.prefill_chunk or length
        return [(a, min(a + step, length)) for a in range(0, length, step)]

    def _warn_chunk_mismatch(self) -> None:
        """Log the one-line mismatch warning, once per (file, run chunk)."""
        message = thresholds_io.chunk_mismatch(self.thresholds_path, self._file_chunk, self.prefill_chunk)
        if message and self.state.thresholds is not None and message not in self._warned:
            self._warned.add(message)
            _log.warning(message)

    @property
    def devices(self) -> list[torch.device]:
        """The devices holding the model's weights (several with device_map="auto")."""
        return sorted({p.device for p in self.model.parameters()}, key=str)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def method(self) -> str:
        return self.state.method

    @property
    def dense_backend(self) -> str:
        return _backend_label(_probe(*self._shape, self.dtype, self.device), self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def sale_backend(self) -> str:
        """The backend sale_attention picks for this model's prefill calls ("cuda" or "reference")."""
        from sale_cli.kernels.api import _choose_backend

        hq, hkv, d = self._shape
        q = torch.empty(1, hq, 1, d, device=self.device, dtype=self.dtype)
        k = torch.empty(1, hkv, 1, d, device=self.device, dtype=self.dtype)
        opts = self.options
        return _choose_backend(opts.backend, q, k, block_q=opts.block_q, block_k=opts.block_k, estimate=opts.estimate)

    def set_method(self, method: str, thresholds: str | os.PathLike | torch.Tensor | None = None, *,
                   theta: float | None = None, results_dir: str | os.PathLike = "results"):
        """Switch to "dense" or "sale"; "sale" needs a thresholds file/tensor or a theta with a default file.

        Switching back to "sale" without either keeps the thresholds already loaded.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "sale" and thresholds is None and theta is None and self.state.thresholds is not None:
            self.state.method = method
            return
        if method == "sale":
            if thresholds is None and theta is None:
                raise ValueError("method 'sale' needs thresholds: pass --thresholds PATH or --theta X "
                                 f"(after `sale calibrate {self.model_name} --theta X`)")
            if isinstance(thresholds, torch.Tensor):
                tau, self._file_chunk = thresholds, None
                if tuple(tau.shape) != (self.num_layers, self.num_heads):
                    raise ValueError(f"thresholds must have shape [{self.num_layers}, {self.num_heads}], "
                                     f"got {tuple(tau.shape)}")
            else:
                path = Path(thresholds) if thresholds is not None else thresholds_io.default_path(
                    results_dir, self.model_name, theta)
                if self.adopt_file_options and path.is_file():
                    _, meta = thresholds_io.load(path)
                    if "block_q" in meta:
                        try:
                            opts = SaleOptions.from_metadata(meta, self.options.backend)
                        except (KeyError, ValueError) as exc:
                            raise ValueError(f"{path}: unreadable op options in its metadata ({exc}); "
                                             "recreate it with `sale calibrate`") from exc
                        self.options = self.state.options = opts
                tau, meta = thresholds_io.load(path, num_layers=self.num_layers, num_heads=self.num_heads,
                                               options=self.options, model=self.model_name)
                self.thresholds_path, self._file_chunk = path, thresholds_io.recorded_chunk(meta)
            self.state.set_thresholds(tau)
            if not isinstance(thresholds, torch.Tensor):
                self._warn_chunk_mismatch()
        self.state.method = method

    @contextmanager
    def capture(self, hook: Callable) -> Iterator[None]:
        """Within the block, every dense prefill call also calls ``hook(layer, q, k, v, dense_out, scale)``:
        once per layer and prefill chunk, q holding the chunk's rows and k, v every position so far (calibration
        compares SALE against ``dense_out`` there). SALE calls and decode steps do not call it."""
        previous, self.state.hook = self.state.hook, hook
        try:
            yield
        finally:
            self.state.hook = previous

    @contextmanager
    def stage_timings(self) -> Iterator[None]:
        """Within the block, SALE prefills on the CUDA kernel report quant/select/compute ms in the result's
        ``timings``; the kernel synchronizes after each stage then, so keep these prefills out of timed runs."""
        previous, self.state.stage_timings = self.state.stage_timings, True
        try:
            yield
        finally:
            self.state.stage_timings = previous

    def apply_chat_template(self, text: str) -> str:
        """The prompt wrapped as one user turn with the generation prompt, or unchanged without a template."""
        if not getattr(self.tokenizer, "chat_template", None):
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def _ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty list of ints or a [1, L] tensor, got {tuple(ids.shape)}")
        return ids.to(self.device)

    def _sync(self):
        if self.device.type == "cuda":  # every GPU: with device_map="auto" the layers run on several
            for index in range(torch.cuda.device_count()):
                torch.cuda.synchronize(index)

    def _forward(self, ids, cache=None):
        """The recorded prefill of ``ids``: one forward per chunk of ``prefill_chunk`` tokens, through ``cache``
        (a DynamicCache; made here when chunks need one, none for a single uncached forward).

        Returns (logits of the last position [vocab], prefill ms, attention ms, per-layer density, timings):
        the prefill time spans all chunks, attention and stage times are summed over chunks, and a head's
        density is computed / visible block pairs over all its chunks' calls.
        """
        bounds = self.chunk_bounds(ids.shape[1])
        if cache is None and len(bounds) > 1:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        kwargs = {"use_cache": False} if cache is None else {"use_cache": True, self._cache_kw: cache}
        state = self.state
        state.records = []
        state.recording = state.prefilling = True
        self._sync()
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for a, b in bounds:
                    out = self.model(ids[:, a:b], logits_to_keep=1, **kwargs)
            self._sync()
        finally:
            state.recording = state.prefilling = False
        prefill_ms = (time.perf_counter() - start) * 1000
        attn_ms, timings = 0.0, {}
        weighted: dict[int, list] = {}  # layer -> [sum of density x visible pairs, sum of visible pairs]
        bq, bk = self.options.block_q, self.options.block_k
        for layer, t0, t1, dens, split, lq, lk in state.records:
            attn_ms += _elapsed_ms(t0, t1)
            if dens is not None:
                pairs = visible_block_pairs(lq, lk, bq, bk)
                acc = weighted.setdefault(layer, [0.0, 0])
                acc[0], acc[1] = acc[0] + dens.float().cpu() * pairs, acc[1] + pairs
            for name, ms in (split or {}).items():
                timings[name] = timings.get(name, 0.0) + ms
        state.records = []
        density = [[1.0] * self.num_heads for _ in range(self.num_layers)]
        for layer, (total, pairs) in weighted.items():
            density[layer] = (total / pairs).tolist()
        return out.logits[0, -1], prefill_ms, attn_ms, density, timings

    def prefill(self, input_ids) -> PrefillResult:
        """The prompt through the model (in chunks of ``prefill_chunk``; no cache kept), timed and with the block
        density per layer and head."""
        logits, prefill_ms, attn_ms, density, timings = self._forward(self._ids(input_ids))
        return PrefillResult(prefill_ms, attn_ms, _mean(density), density, logits.float().cpu(), timings)

    def generate(self, input_ids, max_new_tokens: int, stop_on_newline: bool = False,
                 min_new_tokens: int = 0) -> GenerationResult:
        """Greedy decoding: a recorded (chunked) prefill, then dense decode steps over the KV cache.

        Stops at an end-of-sequence token (or a newline with ``stop_on_newline``), never before
        ``min_new_tokens`` tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self._ids(input_ids)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        logits, prefill_ms, attn_ms, density, timings = self._forward(ids, cache)
        stop = set(self._eos_ids())
        if stop_on_newline:
            stop.update(self.tokenizer.encode("\n", add_special_tokens=False)[-1:])
        new: list[int] = []
        blocked = torch.tensor(sorted(stop), dtype=torch.long)

        def pick(logits: torch.Tensor) -> int:
            if len(new) < min_new_tokens and len(blocked):
                logits = logits.float().index_fill(0, blocked.to(logits.device), -math.inf)
            return int(logits.argmax())

        token = pick(logits)
        with torch.inference_mode():
            while token not in stop:
                new.append(token)
                if len(new) >= max_new_tokens:
                    break
                out = self.model(torch.tensor([[token]], device=self.device), use_cache=True, **{self._cache_kw: cache})
                token = pick(out.logits[0, -1])
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return GenerationResult(text, len(new), ids.shape[1], prefill_ms, attn_ms, _mean(density), timings)

    @property
    def _cache_kw(self) -> str:
        """transformers renamed ``past_key_values`` to ``cache`` in 5.2x; pass whichever this version takes."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _mean(rows: list[list[float]]) -> float:
    flat = [x for row in rows for x in row]
    return sum(flat) / len(flat)
