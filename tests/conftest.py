"""Shared test helpers and fixtures: tiny random Llama/Qwen2 models saved with their tokenizers, random prompts,
the float64 per-head error oracle of calibration, and lines a test module prints at the end of the run.

Test modules import the helpers with ``from conftest import ...`` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HEADS, KV_HEADS = 4, 2  # every tiny model's attention: GQA 2:1


def save_tiny_model(path, text: str, *, arch: str = "llama", vocab_size: int = 400, hidden_size: int = 64,
                    intermediate_size: int = 128, layers: int = 2, max_positions: int = 4096, sharpen: float = 8.0,
                    tokenizer_special_ids: bool = False) -> Path:
    """A random ``arch`` ("llama" or "qwen2") model (4 query heads, 2 kv heads) and a BPE tokenizer trained on
    ``text``, saved to ``path``; the weights depend only on the arguments (seed 0).

    ``sharpen`` multiplies q_proj and k_proj, so that attention is peaked enough for sparsity to show (1: the
    default init). ``tokenizer_special_ids``: the config's bos/eos ids are the tokenizer's (generation stops at
    its eos)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from sale_cli.eval.niah import train_tokenizer

    tok = train_tokenizer(text, vocab_size=vocab_size)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id) if tokenizer_special_ids else {}
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=max_positions, **special)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if sharpen != 1:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(sharpen)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def cpu_runner(path, **kwargs):
    """The runner on a saved tiny model, float32 on the CPU; ``kwargs`` go to load_runner."""
    from sale_cli.runner import load_runner

    return load_runner(str(path), dtype="float32", device="cpu", **kwargs)


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """[1, n] token ids, uniform over the vocabulary, the same for a seed."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def head_errors(runner, tau: torch.Tensor, ids) -> torch.Tensor:
    """Each head's calibration error at ``tau`` [layers, heads] on one prompt, as the spec defines it
    (mean over the rows of the L1 distance between SALE's and dense attention's output rows): an oracle computed
    here in float64 from the op's output, independent of calibrate.py's measurement (only the dense prefill that
    calls the hook is calibrate's)."""
    from sale_cli.calibrate import _hooked_prefill
    from sale_cli.kernels import sale_attention

    errors = {}

    def hook(layer, q, k, v, dense_out, scale):
        out = sale_attention(q, k, v, tau[layer], scale=scale, **runner.options.op_kwargs())
        errors[layer] = (out.double() - dense_out.double()).abs().sum(dim=(2, 3)).mean(0) / q.shape[2]

    _hooked_prefill(runner, ids, hook)
    return torch.stack([errors[i] for i in range(len(errors))]).float()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama (4 heads, 2 kv heads; niah's "tiny" preset) with a tokenizer trained on the
    bundled haystack, saved as .../tiny-llama. Shared by the whole session: copy it before changing it."""
    from transformers import LlamaForCausalLM

    from sale_cli.eval import niah

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    config = niah.write_config_dir(path, preset="tiny", vocab_size=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# lines for the end of the run


_SUMMARY = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def run_summary(request) -> list[str]:
    """A list a test module appends lines to; they are printed after the run (even without -s), e.g. totals over
    a module's cases for a device log."""
    return request.config.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("summary")
        for line in lines:
            terminalreporter.write_line(line)
