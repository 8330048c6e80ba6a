"""User mistakes end in one or two lines naming the option or file (exit 1, or 2 for usage), never a traceback;
--debug or SALE_DEBUG=1 shows the traceback. Runs the real `sale` app on a tiny random Llama on the CPU."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from sale_cli import thresholds as thresholds_io
from sale_cli.cli import app
from sale_cli.options import SaleOptions

ROOT = Path(__file__).resolve().parents[1]
LB_DATA = Path(__file__).parent / "fixtures" / "longbench"
IB_DATA = Path(__file__).parent / "fixtures" / "infinitebench"


def sale(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=250, env={"COLUMNS": "250", **(env or {})})


def assert_user_error(result, *words: str, code: int = 1) -> None:
    """Exit `code`, no traceback, and every word in the output."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    if code == 1:
        assert out.count("error: ") == 1 and len(out[out.index("error: "):].strip().splitlines()) <= 2, out
        assert result.exception is None or isinstance(result.exception, SystemExit)
    for word in words:
        assert word in out, (word, out)


# ---------------------------------------------------------------------------------------------------------------
# the mechanism


def test_entry_point_is_main():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("[")[0]
    assert scripts.strip() == 'sale = "sale_cli.cli:main"'


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no-model"
    assert_user_error(sale("calibrate", f"{missing}/", "--out", tmp_path / "t.safetensors"), str(missing))
    for result in (sale("--debug", "calibrate", f"{missing}/", "--out", tmp_path / "t.safetensors"),
                   sale("calibrate", f"{missing}/", "--out", tmp_path / "t.safetensors", env={"SALE_DEBUG": "1"})):
        assert result.exit_code == 1 and isinstance(result.exception, ValueError), result.output
    # the benchmark commands' own error lines honour --debug too
    from sale_cli.errors import UserError

    args = ["longbench", "--exp", "../x", "--eval-only", "--results-dir", tmp_path]
    assert_user_error(sale(*args), "--exp")
    result = sale("--debug", *args)
    assert result.exit_code == 1 and isinstance(result.exception, UserError), result.output


def test_console_script_prints_one_line(tmp_path):
    """Through the real entry point: `python -m sale_cli.cli` runs main()."""
    done = subprocess.run([sys.executable, "-m", "sale_cli.cli", "calibrate", str(tmp_path / "nothing.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: ") and "nothing.gguf" in done.stderr and "Traceback" not in done.stderr
    usage = subprocess.run([sys.executable, "-m", "sale_cli.cli", "calibrate", "--samples", "x"],
                           capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "--samples" in usage.stderr  # click's usage errors keep exit code 2


# ---------------------------------------------------------------------------------------------------------------
# bad values are rejected before any work, naming the option


@pytest.mark.parametrize("args, option", [
    (["calibrate", "--theta", "nan"], "--theta"),
    (["calibrate", "--theta", "inf"], "--theta"),
    (["calibrate", "--theta", "0"], "--theta"),
    (["calibrate", "--theta", "-1"], "--theta"),
    (["calibrate", "--samples", "0"], "--samples"),
    (["calibrate", "--tokens", "0"], "--tokens"),
    (["calibrate", "--tau0", "-0.1"], "--tau0"),
    (["calibrate", "--tau0", "nan"], "--tau0"),
    (["calibrate", "--tau0", "inf"], "--tau0"),
    (["demo", "--theta", "-1"], "--theta"),
    (["demo", "--theta", "nan"], "--theta"),
    (["demo", "--prompts", "0"], "--prompts"),
])
def test_bad_values_are_rejected_up_front(args, option, tmp_path):
    assert_user_error(sale(*args, "--results-dir", tmp_path), option, code=2)
    assert not any(tmp_path.iterdir())  # nothing was started


def test_calibrate_out_is_checked_before_loading(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    assert_user_error(sale("calibrate", "nowhere/x", "--out", folder), "--out", str(folder), "folder")
    afile = tmp_path / "file"
    afile.write_text("x")
    assert_user_error(sale("calibrate", "nowhere/x", "--out", afile / "sub" / "t.safetensors"), "--out", str(afile))
    assert_user_error(sale("calibrate", "nowhere/x", "--results-dir", afile), "--results-dir", str(afile))
    assert_user_error(sale("demo", "--results-dir", afile / "r"), "--results-dir", str(afile))


# ---------------------------------------------------------------------------------------------------------------
# models


def test_bad_gguf_and_truncated_weights(tiny_llama, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert_user_error(sale("calibrate", bad, "--out", tmp_path / "t.safetensors"), "bad.gguf")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    assert_user_error(sale("calibrate", broken, "--out", tmp_path / "t.safetensors"), "could not load model",
                      str(broken))


@pytest.mark.parametrize("outcome", ["not_found", "offline"])
@pytest.mark.parametrize("command", ["calibrate", "longbench", "infinitebench"])
def test_mistyped_hub_id_fails_fast(command, outcome, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []

    def model_info(repo_id, **kwargs):
        calls.append(repo_id)
        if outcome == "offline":
            raise ConnectionError("Name or service not known")
        raise RepositoryNotFoundError("404 Client Error", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    # the data is checked before the model: name a dataset/task whose fixture file exists
    extra = {"calibrate": [], "longbench": ["--exp", "x", "--data-dir", LB_DATA, "--datasets", "trec"],
             "infinitebench": ["--exp", "x", "--data-dir", IB_DATA, "--tasks", "passkey"]}[command]
    result = sale(command, "meta-lama/Llama-3.1-8B", *extra, "--results-dir", tmp_path)
    assert_user_error(result, "meta-lama/Llama-3.1-8B", "spelling" if outcome == "not_found" else "not reachable")
    assert calls == ["meta-lama/Llama-3.1-8B"]  # one query, no retries


def test_device_names_are_checked(tiny_llama, tmp_path):
    assert_user_error(sale("calibrate", tiny_llama, "--device", "gpu", "--out", tmp_path / "t.safetensors"),
                      "--device", "'gpu'")
    if not torch.cuda.is_available():
        assert_user_error(sale("calibrate", tiny_llama, "--device", "cuda", "--out", tmp_path / "t.safetensors"),
                          "--device cuda", "--device cpu")
        assert_user_error(sale("longbench", tiny_llama, "--exp", "x", "--device", "cuda:0", "--results-dir", tmp_path,
                               "--data-dir", LB_DATA, "--datasets", "trec"), "--device cuda:0")


# ---------------------------------------------------------------------------------------------------------------
# thresholds files


def _save_tau(path: Path, tau: torch.Tensor) -> Path:
    return thresholds_io.save(path, tau, model="tiny-llama", theta=0.4, tau0=0.008, samples=1, tokens=64,
                              options=SaleOptions())


@pytest.mark.parametrize("bad", [math.inf, math.nan, -0.5])
def test_thresholds_loader_rejects_non_finite_and_negative(bad, tmp_path):
    tau = torch.full((2, 4), 0.004)
    tau[1, 2] = bad
    path = _save_tau(tmp_path / "t.safetensors", tau)
    with pytest.raises(ValueError, match=r"t\.safetensors: thresholds must be finite and >= 0"):
        thresholds_io.load(path)


def test_corrupt_thresholds_and_partial_files(tiny_llama, tmp_path):
    good = _save_tau(tmp_path / "good.safetensors", torch.full((2, 4), 0.004))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable .safetensors file"):
        thresholds_io.load(cut)
    data = ["--results-dir", tmp_path, "--data-dir", LB_DATA, "--datasets", "trec", "--limit", "1"]
    assert_user_error(sale("longbench", tiny_llama, "--exp", "x", "--method", "sale", "--thresholds", cut, *data),
                      str(cut))
    # calibrate: a broken partial file of an interrupted run says how to start afresh
    out = tmp_path / "cal" / "theta.safetensors"
    out.parent.mkdir()
    partial = out.with_name("theta.partial.safetensors")
    partial.write_bytes(b"\x00" * 20)
    assert_user_error(sale("calibrate", tiny_llama, "--out", out, "--tokens", "64", "--samples", "1"), str(partial),
                      "delete it")


# ---------------------------------------------------------------------------------------------------------------
# experiments and runs


@pytest.mark.parametrize("exp", ["../x", "/tmp/abs", "", ".", "..", "a/b"])
def test_exp_must_be_a_plain_name(exp, tmp_path):
    named = ("--exp", "is not an experiment name")
    assert_user_error(sale("longbench", "--exp", exp, "--results-dir", tmp_path / "r", "--eval-only"), *named)
    assert_user_error(sale("infinitebench", "--exp", exp, "--results-dir", tmp_path / "r", "--eval-only"), *named)
    assert_user_error(sale("summarize", "--exp", f"ok,{exp}" if exp else "..", "--results-dir", tmp_path / "r"),
                      *named)
    assert_user_error(sale("latency", "--exp", exp, "--results-dir", tmp_path / "r", "--methods", "dense"), *named)
    assert not (tmp_path / "x").exists() and not (tmp_path / "r").exists()


def _write_lines(path: Path, lines: list[str], raw: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw if raw is not None else "".join(line + "\n" for line in lines).encode())
    return path


def _trec_lines() -> list[str]:
    return (LB_DATA / "trec.jsonl").read_text(encoding="utf-8").splitlines()


def _lb(tiny_llama, tmp_path, data_dir, *more):
    return sale("longbench", tiny_llama, "--exp", "e", "--results-dir", tmp_path / "r", "--data-dir", data_dir,
                "--datasets", "trec", "--max-length", "200", "--device", "cpu", "--dtype", "float32", *more)


def test_bad_data_lines_name_file_and_line(tiny_llama, tmp_path):
    lines = _trec_lines()
    data = tmp_path / "data"
    no_answers = json.loads(lines[1])
    del no_answers["answers"]
    cases = {
        "missing field": ([lines[0], json.dumps(no_answers)], None, ["trec.jsonl:2", "'answers'"]),
        "not an object": ([lines[0], "[1, 2]"], None, ["trec.jsonl:2", "JSON object"]),
        "malformed": ([lines[0], lines[1][:40]], None, ["trec.jsonl:2", "not valid JSON"]),
        "not utf-8": ([], (lines[0] + "\n").encode() + b'{"input": "caf\xe9"}\n', ["trec.jsonl:2", "UTF-8"]),
        "empty": ([], b"", ["trec.jsonl", "empty"]),
    }
    for name, (rows, raw, words) in cases.items():
        _write_lines(data / "trec.jsonl", rows, raw)
        result = _lb(tiny_llama, tmp_path, data)
        assert_user_error(result, *words)
        assert "no predictions" not in result.output, name


def test_bom_is_accepted_and_failed_run_does_not_block_its_rerun(tiny_llama, tmp_path):
    data = tmp_path / "data"
    lines = _trec_lines()
    _write_lines(data / "trec.jsonl", [], b"\xef\xbb\xbf" + "".join(ln + "\n" for ln in lines[:1] + ["{"]).encode())
    assert_user_error(_lb(tiny_llama, tmp_path, data, "--limit", "2"), "trec.jsonl:2")  # fails before any prediction
    assert (tmp_path / "r/e/longbench/run.json").exists()
    _write_lines(data / "trec.jsonl", [], b"\xef\xbb\xbf" + "".join(ln + "\n" for ln in lines[:2]).encode())
    result = _lb(tiny_llama, tmp_path, data, "--limit", "2", "--max-length", "220")  # another configuration: accepted
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r/e/longbench/run.json").read_text())["max_length"] == 220
    assert len((tmp_path / "r/e/longbench/trec.jsonl").read_text().splitlines()) == 2
    # with predictions present, another configuration is still refused
    assert_user_error(_lb(tiny_llama, tmp_path, data, "--max-length", "240"), "--exp", "max_length")


def test_summarize_rejects_a_foreign_or_truncated_result_json(tmp_path):
    folder = tmp_path / "r" / "e" / "longbench"
    rec = {"pred": "a", "answers": ["a"], "all_classes": None, "length": 1, "_id": "0"}
    _write_lines(folder / "hotpotqa.jsonl", [json.dumps(rec)])
    result = folder / "result.json"
    # summarize says in one line what it skips (and rescores the predictions instead): no traceback
    for text, words in (('{"hotpotqa": 100.0, "average": 100.0, "extra": "x"}', ["result.json", "'extra'"]),
                        ('{"hotpotqa": 100.0, "aver', ["result.json:1", "not valid JSON"])):
        result.write_text(text)
        os.utime(result, (2e9, 2e9))  # newer than the predictions: summarize reads it
        out = sale("summarize", "--results-dir", tmp_path / "r")
        text_out = " ".join(out.output.split())
        assert out.exit_code == 0 and "Traceback" not in text_out, text_out
        assert "skipped" in text_out and all(w in text_out for w in words), text_out


def test_second_run_on_the_same_experiment_is_refused(tiny_llama, tmp_path):
    """A run holds an OS lock on RESULTS_DIR/EXP/<benchmark>; kill -9 of the holder frees it."""
    folder = tmp_path / "r" / "e" / "longbench"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from sale_cli.eval.common import run_lock\n"
         f"with run_lock(Path({str(folder)!r})):\n    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = _lb(tiny_llama, tmp_path, LB_DATA, "--limit", "1")
        assert_user_error(result, str(folder), "in use by another run", f"pid {holder.pid}")
        assert not (folder / "trec.jsonl").exists()
        ib = sale("infinitebench", tiny_llama, "--exp", "e", "--results-dir", tmp_path / "r", "--data-dir", IB_DATA,
                  "--tasks", "passkey", "--limit", "1", "--max-length", "300", "--device", "cpu")
        assert ib.exit_code == 0, ib.output  # another benchmark of the same experiment is free
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    result = _lb(tiny_llama, tmp_path, LB_DATA, "--limit", "1")
    assert result.exit_code == 0, result.output


_RANK_SCRIPT = """
import os, sys, time
from pathlib import Path
from sale_cli.eval.common import barrier, finish_ranks, rank_world, run_lock
folder, flags = Path(sys.argv[1]), Path(sys.argv[2])
rank, world = rank_world()
with run_lock(folder):
    (flags / f"in{rank}").touch()
    while not (flags / "go").exists():
        time.sleep(0.1)
barrier()
finish_ranks()
"""


def test_ranks_of_one_torchrun_share_the_lock(tmp_path):
    """Both ranks of one data-parallel run enter; a separate run meanwhile is refused."""
    import socket

    from sale_cli.errors import UserError
    from sale_cli.eval.common import run_lock

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder, flags = tmp_path / "exp" / "longbench", tmp_path / "flags"
    flags.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(folder), str(flags)],
                              env={**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    try:
        for r in (0, 1):
            for _ in range(600):
                if (flags / f"in{r}").exists() or procs[r].poll() is not None:
                    break
                time.sleep(0.1)
            assert (flags / f"in{r}").exists(), f"rank {r} did not get in"
        with pytest.raises(UserError, match="in use by another run"), run_lock(folder):
            pass
    finally:
        (flags / "go").touch()
        codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0]
    with run_lock(folder):  # free again
        pass


# ---------------------------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(mask, mode, tmp_path):
    from sale_cli.eval.common import atomic_write_json

    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode
