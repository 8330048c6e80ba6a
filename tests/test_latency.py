"""`sale latency`: haystack, token-exact needle prompts, needle check, timing loop, JSON and table."""

import gzip
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from sale_cli.eval import niah


@pytest.fixture(scope="module")
def tokenizer():
    return niah.train_tokenizer(niah.load_haystack(), vocab_size=1024)


def _chat(tokenizer):
    return lambda text: tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def test_bundled_haystack_is_a_novel_and_splits_losslessly():
    text = niah.load_haystack()
    assert "BOTCHAN" in text and len(text) > 200_000
    assert "gutenberg" not in text.lower()
    pieces = niah.split_sentences(text)
    assert "".join(pieces) == text and len(pieces) > 1000
    assert all(p[0].isspace() for p in pieces[1:])


def test_custom_haystack_plain_and_gzip(tmp_path):
    plain, packed = tmp_path / "h.txt", tmp_path / "h.txt.gz"
    plain.write_text("One. Two!\r\nThree?", encoding="utf-8")
    packed.write_bytes(gzip.compress(b"One. Two!\nThree?"))
    assert niah.load_haystack(plain) == niah.load_haystack(packed) == "One. Two!\nThree?"
    with pytest.raises(FileNotFoundError, match="--haystack"):
        niah.load_haystack(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        niah.load_haystack(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="UTF-8"):
        niah.load_haystack(tmp_path / "bin.txt")


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_has_exact_length_and_keeps_question(tokenizer, chat):
    builder = niah.NiahPromptBuilder(
        tokenizer, niah.load_haystack(), chat_template=_chat(tokenizer) if chat else None
    )
    for length in (builder.fixed_tokens, builder.fixed_tokens + 1, 300, 2048, 150_000):
        prompt = builder.build(length, depth=0.5)
        ids = prompt.input_ids
        assert len(ids) == length
        assert ids[: len(builder.head)] == builder.head
        assert ids[prompt.question_start :] == builder.tail
        assert niah.DEFAULT_QUESTION in tokenizer.decode(ids[prompt.question_start :])
        needle = ids[prompt.needle_start : prompt.needle_start + prompt.needle_tokens]
        assert needle == builder.needle
        assert prompt.haystack_tokens == length - builder.fixed_tokens
    assert prompt.haystack_copies >= 2  # 150K tokens need more than one copy of the novel
    text = tokenizer.decode(builder.build(300).input_ids)
    assert text.count(niah.DEFAULT_NEEDLE) == 1
    assert text.startswith("<|bos|><|user|>") == chat


def test_short_haystack_repeats_and_needle_depth(tokenizer):
    builder = niah.NiahPromptBuilder(tokenizer, "The cat sat. The dog ran. A bird sang.")
    prompt = builder.build(400, depth=0.5)
    assert len(prompt.input_ids) == 400 and prompt.haystack_copies > 5
    assert abs(prompt.needle_depth - 0.5) < 0.1
    first = builder.build(400, depth=0.0)
    assert first.needle_start == len(builder.head) and first.needle_depth == 0.0
    last = builder.build(400, depth=1.0)
    assert last.needle_start + last.needle_tokens == last.question_start and last.needle_depth == 1.0


def test_length_shorter_than_the_fixed_parts_is_rejected(tokenizer):
    builder = niah.NiahPromptBuilder(tokenizer, niah.load_haystack())
    with pytest.raises(ValueError, match=f"length {builder.fixed_tokens - 1} is too short"):
        builder.build(builder.fixed_tokens - 1)
    with pytest.raises(ValueError, match="depth"):
        builder.build(500, depth=1.5)


@pytest.mark.parametrize(
    ("output", "found"),
    [
        ("The secret number is 4817.", True),
        ("4817", True),
        ("It is 4,817!", True),
        ("the number: 4817\nmore text", True),
        ("48170", False),
        ("14817 and 4818", False),
        ("I could not find it.", False),
        ("", False),
    ],
)
def test_needle_recovered(output, found):
    assert niah.needle_recovered(output, "4817") is found


def test_needle_recovered_words_ignore_case_and_punctuation():
    assert niah.needle_recovered("It's the AMBER-falcon, surely.", "amber falcon")
    assert not niah.needle_recovered("amberfalcon", "amber falcon")
    with pytest.raises(ValueError, match="expect"):
        niah.needle_recovered("anything", " ?! ")


def test_resolve_lengths():
    assert niah.resolve_lengths(131072, [1, 0.5, 0.25, 0.125, 0.0625]) == [8192, 16384, 32768, 65536, 131072]
    assert niah.resolve_lengths(131072, [1], [512, 256, 512]) == [256, 512]
    with pytest.raises(ValueError, match="fractions"):
        niah.resolve_lengths(1000, [0.5, 1.5])
    with pytest.raises(ValueError, match="lengths"):
        niah.resolve_lengths(1000, [1], [0])
    with pytest.raises(ValueError, match="length"):
        niah.resolve_lengths(-4, [1])


class FakeRunner:
    """Stands in for the model runner; logs the calls and returns fixed timings per method."""

    def __init__(self):
        self.method = "sale"
        self.thresholds_path = "tau.safetensors"
        self.sale_backend = "reference"
        self.calls = []

    def set_method(self, method, thresholds=None):
        self.calls.append(("set", method, thresholds))
        self.method = method

    def prefill(self, input_ids):
        self.calls.append(("prefill", self.method, input_ids.shape[1]))
        if self.method == "dense":
            return SimpleNamespace(prefill_ms=10.0, attn_ms=6.0, density=1.0, timings={})
        split = {"quant": 0.2, "select": 0.3, "compute": 1.5}
        return SimpleNamespace(prefill_ms=6.0, attn_ms=2.0, density=0.25, timings=split)

    def generate(self, input_ids, max_new_tokens):
        self.calls.append(("generate", self.method, max_new_tokens))
        return SimpleNamespace(text="It is 4817." if self.method == "dense" else "No idea.")


def _prompts(tokenizer, lengths):
    builder = niah.NiahPromptBuilder(tokenizer, niah.load_haystack())
    return {n: builder.build(n) for n in lengths}


def test_run_benchmark_alternates_methods_with_warmup_after_each_switch(tokenizer):
    runner = FakeRunner()
    prompts = _prompts(tokenizer, [200, 300])
    found = niah.run_benchmark(
        runner, prompts, ["dense", "sale"], repeats=3, warmup=1, answer_tokens=4, console=Console(quiet=True)
    )

    def block(method, n):
        return [("prefill", method, n)] * 4 + [("generate", method, 4)]

    # 200 tokens: dense then sale; 300 tokens: sale (no switch needed) then dense
    assert runner.calls == [
        ("set", "dense", None),
        *block("dense", 200),
        ("set", "sale", None),
        *block("sale", 200),
        *block("sale", 300),
        ("set", "dense", None),
        *block("dense", 300),
    ]
    by_key = {(m.method, m.length): m for m in found}
    assert set(by_key) == {(m, n) for m in ("dense", "sale") for n in (200, 300)}
    assert all(len(m.samples) == 3 for m in found)
    assert by_key[("dense", 300)].needle_found is True and by_key[("sale", 300)].needle_found is False
    assert by_key[("sale", 200)].samples[0].timings == {"quant": 0.2, "select": 0.3, "compute": 1.5}


def test_summarize_records_speedups_and_overhead(tokenizer):
    prompts = _prompts(tokenizer, [200])
    runs = [
        niah.Sample(12.0, 8.0, 1.0, {}),
        niah.Sample(10.0, 6.0, 1.0, {}),
        niah.Sample(11.0, 7.0, 1.0, {}),
    ]
    sale = [niah.Sample(6.0, 2.0, 0.3, {"quant": 0.2, "select": 0.3, "compute": 1.5})] * 3
    env = {"device": "cpu", "gpu": None, "torch": "x", "cuda": None, "dense_backend": "sdpa:math"}
    env["sale_backend"] = "reference"
    records = niah.summarize(
        [niah.Measurement("dense", 200, runs), niah.Measurement("sale", 200, sale)], prompts, env
    )
    dense, sparse = records
    assert dense["prefill_ms"] == 11.0 and dense["attn_ms"] == 7.0 and dense["density"] == 1.0
    assert dense["backend"] == "sdpa:math" and dense["overhead_pct"] is None and dense["quant_ms"] is None
    assert sparse["backend"] == "reference" and sparse["density"] == 0.3
    assert sparse["attn_speedup"] == pytest.approx(3.5) and sparse["prefill_speedup"] == pytest.approx(11 / 6)
    assert sparse["overhead_pct"] == pytest.approx(25.0) and sparse["select_ms"] == 0.3
    table = Console(record=True, width=250)
    table.print(niah.latency_table(records, {**env, "model": "tiny"}))
    shown = table.export_text()
    assert "reference backend" in shown and "3.50x" in shown and "25.0" in shown


def test_write_json_atomic_leaves_no_temporary_file(tmp_path):
    from sale_cli.eval.common import atomic_write_json

    path = tmp_path / "a" / "latency.json"
    atomic_write_json(path, {"records": [1, 2]})
    assert json.loads(path.read_text()) == {"records": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["latency.json"]


def test_write_config_dir_tiny(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    niah.write_config_dir(tmp_path, preset="tiny", vocab_size=512)
    config = AutoConfig.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    assert config.vocab_size == len(tok) and config.eos_token_id == tok.eos_token_id
    assert tok.decode(tok("Kiyo waited.")["input_ids"]) == "Kiyo waited."
    with pytest.raises(ValueError, match="preset"):
        niah.write_config_dir(tmp_path, preset="gpt-9")


def _app():
    import typer

    from sale_cli.commands.latency import latency

    app = typer.Typer()
    app.command()(latency)
    return app


@pytest.fixture(scope="module")
def tiny_model(tiny_llama, tmp_path_factory):
    """The shared tiny Llama (conftest.py), and SALE thresholds for it."""
    import torch

    from sale_cli import thresholds as thresholds_io
    from sale_cli.options import SaleOptions

    path = tiny_llama
    tau = thresholds_io.save(
        tmp_path_factory.mktemp("thresholds") / "tau.safetensors",
        torch.full((2, 4), 0.05),
        model=path.name,
        theta=0.05,
        tau0=0.05,
        samples=1,
        tokens=1,
        options=SaleOptions(),
    )
    return path, tau


def test_latency_command_end_to_end_on_cpu(tiny_model, tmp_path):
    from typer.testing import CliRunner

    model, tau = tiny_model
    args = [str(model), "--lengths", "192,320", "--repeats", "2", "--answer", "--answer-tokens", "3"]
    args += ["--thresholds", str(tau), "--device", "cpu", "--results-dir", str(tmp_path)]
    result = CliRunner().invoke(_app(), args, terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "NIAH prefill latency" in result.output and "reference backend" in result.output
    payload = json.loads((tmp_path / "latency-tiny-llama" / "latency.json").read_text())
    env = payload["environment"]
    assert env["device"] == "cpu" and env["sale_backend"] == "reference" and env["torch"]
    assert {"gpu", "cuda", "dense_backend", "transformers", "dtype"} <= set(env)
    records = {(r["method"], r["length"]): r for r in payload["records"]}
    assert set(records) == {(m, n) for m in ("dense", "sale") for n in (192, 320)}
    for (method, n), r in records.items():
        for key in ("prefill_ms", "attn_ms", "density", "backend", "device", "gpu", "torch", "cuda"):
            assert key in r, key
        assert r["input_tokens"] == n and r["repeats"] == 2 and len(r["attn_ms_runs"]) == 2
        assert r["prefill_ms"] > 0 and 0 < r["attn_ms"] <= r["prefill_ms"]
        assert isinstance(r["needle_found"], bool) and isinstance(r["answer"], str)
        if method == "dense":
            assert r["density"] == 1.0 and r["attn_speedup"] == 1.0 and r["backend"] == env["dense_backend"]
        else:
            assert 0.0 < r["density"] <= 1.0 and r["backend"] == "reference" and r["attn_speedup"] > 0


def test_latency_command_rejects_bad_arguments_before_loading(tmp_path):
    from typer.testing import CliRunner

    app, runner = _app(), CliRunner()
    (tmp_path / "tau.safetensors").write_bytes(b"")
    both = runner.invoke(app, ["nowhere", "--lengths", "256", "--theta", "0.4", "--thresholds",
                               str(tmp_path / "tau.safetensors")], terminal_width=200)
    assert both.exit_code == 2 and "--thresholds/--theta" in both.output
    for args, option in (
        (["--methods", "dense,flash"], "--methods"),
        (["--methods", "dense", "--lengths", "0"], "--lengths"),
        (["--methods", "dense", "--fractions", "2"], "--fractions"),
        (["--methods", "dense", "--depth", "1.5"], "--depth"),
        (["--methods", "dense", "--repeats", "0"], "--repeats"),
    ):
        result = runner.invoke(app, ["nowhere", *args], terminal_width=200)
        assert result.exit_code == 2 and option in result.output, result.output
