"""Calibration data (kv, prose, code, mix, user files), the held-out check and their bad inputs, on a tiny model."""

import json

import pytest
import torch
from conftest import cpu_runner, head_errors, save_tiny_model

from sale_cli import calibrate as calib
from sale_cli import thresholds as thresholds_io
from sale_cli.data.calibration import (
    KINDS,
    VALIDATION_SEED0,
    CalibrationData,
    _novel_halves,
    builtin_sample,
    validation_samples,
)
from sale_cli.errors import UserError
from sale_cli.options import SaleOptions

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. {\"a1b2\": \"c3d4\"}\n"
        "def load_record(self, x: int) -> str:\n    \"\"\"Return the value.\"\"\"\n    return x + 1\n"
        "Extract the value corresponding to the specified key in the JSON object below. 0123456789abcdef-\n") * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer Llama with sharpened attention (sparsity shows), and a tokenizer that knows code."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), TEXT)


@pytest.fixture(scope="module")
def runner(tiny_dir):
    return cpu_runner(tiny_dir, options=SaleOptions(dense_below=0))


def _count(runner):
    return calib._counter(runner)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_fills_the_requested_tokens(runner, kind):
    count = _count(runner)
    for tokens in (300, 900):
        for split in ("calibration", "validation"):
            text = builtin_sample(kind, 3, tokens, count, split)
            n = count(text)
            slack = 100 if kind == "kv" else 40  # a key-value pair is about 70 tiny-tokenizer tokens
            assert tokens - slack <= n <= tokens, (kind, tokens, n)
    assert builtin_sample(kind, 3, 300, count) == builtin_sample(kind, 3, 300, count), "deterministic"
    assert builtin_sample(kind, 3, 300, count) != builtin_sample(kind, 4, 300, count), "seeds differ"


def test_code_samples_are_python_like(runner):
    text = builtin_sample("code", 0, 900, _count(runner))
    assert "def " in text and '"""' in text and "return " in text


def test_mix_cycles_the_kinds_and_labels_the_samples(runner):
    data = CalibrationData("mix")
    assert [data.plan(i) for i in range(7)] == [("kv", 0), ("prose", 0), ("code", 0), ("kv", 1), ("prose", 1),
                                                ("code", 1), ("kv", 2)]
    assert data.labels(4) == "kv:0,prose:0,code:0,kv:1"
    assert CalibrationData("prose").labels(2) == "prose:0,prose:1"
    count = _count(runner)
    kinds = [data.sample(i, 300, count).kind for i in range(6)]
    assert kinds == ["kv", "prose", "code"] * 2


def test_calibration_and_validation_seeds_and_text_are_disjoint(runner):
    count = _count(runner)
    held_out = validation_samples(2, 300, count)
    assert [s.kind for s in held_out] == ["kv", "kv", "prose", "prose", "code", "code"]
    assert all(s.seed >= VALIDATION_SEED0 for s in held_out)
    data = CalibrationData("mix")
    calibration = [data.sample(i, 300, count) for i in range(9)]
    assert all(s.seed < VALIDATION_SEED0 for s in calibration)
    assert not {s.text for s in calibration} & {s.text for s in held_out}
    first, second = "".join(_novel_halves()[0]), "".join(_novel_halves()[1])
    for sample in held_out:
        if sample.kind == "prose":  # a held-out passage comes from the second half of the novel only
            longest = max(sample.text.splitlines(), key=len)
            assert len(longest) > 40 and longest in second and longest not in first


def test_user_files_txt_jsonl_and_folder(runner, tmp_path):
    count = _count(runner)
    long_text = " ".join(f"Sentence number {i} is about the weather." for i in range(300))
    (tmp_path / "a.txt").write_text(long_text)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": long_text.upper()}) + "\n\n" +
                                      json.dumps({"text": long_text[::-1], "id": 3}) + "\n")
    data = CalibrationData(str(tmp_path))
    assert len(data.documents) == 3
    samples = [data.sample(i, 400, count) for i in range(4)]
    assert [s.seed for s in samples] == [0, 1, 2, 0] and samples[0].kind == "file"
    assert all(360 <= count(s.text) <= 400 for s in samples)
    assert samples[0].text == samples[3].text and samples[0].text != samples[1].text
    assert len(CalibrationData(str(tmp_path / "b.jsonl")).documents) == 2


def test_bad_data_is_one_clear_error(runner, tmp_path):
    count = _count(runner)
    with pytest.raises(UserError, match=r"--data 'proze': unknown kind; use one of kv, prose, code, mix"):
        CalibrationData("proze")
    with pytest.raises(UserError, match="no such file or folder"):
        CalibrationData(str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(UserError, match=r"short.txt: \d+ tokens, fewer than --tokens 400"):
        CalibrationData(str(tmp_path / "short.txt")).sample(0, 400, count)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(UserError, match="bin.txt: cannot read it as UTF-8"):
        CalibrationData(str(tmp_path / "bin.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: each line must be a JSON object with a string \"text\""):
        CalibrationData(str(tmp_path / "bad.jsonl"))
    (tmp_path / "notjson.jsonl").write_text("{oops\n")
    with pytest.raises(UserError, match=r"notjson.jsonl:1: not valid JSON"):
        CalibrationData(str(tmp_path / "notjson.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="expected a .txt or .jsonl file"):
        CalibrationData(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .txt or .jsonl files"):
        CalibrationData(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="--validate must be >= 1, got 0"):
        validation_samples(0, 300, count)


def test_mix_calibration_meets_the_margin_and_records_its_data(runner, tmp_path):
    theta, margin = 0.02, 0.25
    out = tmp_path / "theta_0.02.safetensors"
    tau, _ = calib.calibrate(runner, theta, samples=3, tokens=500, out=out, tau0=0.64, data="mix", margin=margin,
                             progress=False)
    loaded, meta = thresholds_io.load(out, num_layers=2, num_heads=4, options=runner.options)
    assert torch.equal(loaded, tau)
    assert meta["data"] == "mix" and meta["data_samples"] == "kv:0,prose:0,code:0"
    assert meta["margin"] == "0.25" and meta["validation_seed0"] == str(VALIDATION_SEED0)
    assert (tau > 0).any() and (tau < 0.64).any()
    count = _count(runner)
    data = CalibrationData("mix")
    for i in range(3):  # every calibration sample stays below the tightened bound at the final tau
        ids = calib._ids(runner, data.sample(i, 500, count).text)
        want = head_errors(runner, tau, ids)
        err, density = calib.measure(runner, tau, ids)
        assert torch.allclose(err, want, rtol=1e-4, atol=1e-6)
        assert (want[tau > 0] < theta * (1 - margin)).all(), (want, tau)
        assert ((density > 0) & (density <= 1)).all() and (density[tau == 0] == 1).all()
    no_margin, _ = calib.calibrate(runner, theta, samples=3, tokens=500, out=tmp_path / "m0.safetensors", tau0=0.64,
                                   margin=0.0, progress=False)
    assert (tau <= no_margin).all(), "a margin only lowers tau"


def test_check_report_fields_and_its_file(runner, tmp_path):
    theta = 0.2
    tau = torch.tensor([[0.64, 0.0, 0.08, 0.01], [0.32, 0.64, 0.0, 0.02]])
    path = tmp_path / "theta_0.2.safetensors"
    report = calib.check(runner, tau, theta, tokens=300, per_kind=2, thresholds_path=path, progress=False)
    written = json.loads((tmp_path / "theta_0.2.check.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert set(written["kinds"]) == {"kv", "prose", "code"} and written["theta"] == theta and written["tokens"] == 300
    count = _count(runner)
    for kind, r in written["kinds"].items():
        assert r["seeds"] == [VALIDATION_SEED0, VALIDATION_SEED0 + 1]
        errs = [head_errors(runner, tau, calib._ids(runner, builtin_sample(kind, s, 300, count, "validation")))
                for s in r["seeds"]]
        err = torch.stack(errs)
        assert r["heads_below_theta"] == pytest.approx((err < theta).float().mean().item())
        assert r["max_error"] == pytest.approx(err.max().item(), rel=1e-4)
        assert r["max_error_over_theta"] == pytest.approx(r["max_error"] / theta)
        worst = r["worst_heads"][0]
        assert set(worst) == {"layer", "head", "error", "tau"}
        assert worst["error"] == pytest.approx(r["max_error"]) and worst["tau"] == tau[worst["layer"], worst["head"]]
        assert len(r["worst_heads"]) == 5 and 0 < r["mean_density"] <= 1
        assert r["meets_target"] == (r["heads_below_theta"] >= 0.97 and r["max_error_over_theta"] <= 1.5)
    assert (tmp_path / "theta_0.2.check.json").stat().st_size > 0 and not list(tmp_path.glob("*.tmp"))


def _cli(args):
    from typer.testing import CliRunner

    from sale_cli.cli import app

    return CliRunner().invoke(app, ["calibrate", *args], terminal_width=250)


def test_cli_calibrate_with_validate_then_check_alone(tiny_dir, tmp_path):
    out = tmp_path / "theta_0.3.safetensors"
    common = [str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--tokens", "300"]
    done = _cli([*common, "--theta", "0.3", "--samples", "2", "--data", "code", "--out", str(out), "--validate", "1"])
    assert done.exit_code == 0, done.output
    assert "held-out check" in done.output and "prose" in done.output
    meta = thresholds_io.load(out)[1]
    assert meta["data"] == "code" and meta["data_samples"] == "code:0,code:1" and meta["margin"] == "0.25"
    report = json.loads((tmp_path / "theta_0.3.check.json").read_text())
    assert report["samples_per_kind"] == 1 and report["theta"] == 0.3
    (tmp_path / "theta_0.3.check.json").unlink()
    alone = _cli([*common, "--check", str(out), "--validate", "2"])
    assert alone.exit_code == 0, alone.output
    report = json.loads((tmp_path / "theta_0.3.check.json").read_text())
    assert report["samples_per_kind"] == 2 and report["thresholds"] == str(out)
    assert all(len(r["seeds"]) == 2 for r in report["kinds"].values())


@pytest.mark.parametrize("args, message", [
    (["--data", "json"], "--data 'json': unknown kind"),
    (["--validate", "0"], "for --validate: must be at least 1, got 0"),
    (["--check", "nowhere.safetensors"], "--check nowhere.safetensors: no such thresholds file"),
    (["--margin", "1.5"], "--margin must be in [0, 1)"),
    (["--dense-above", "0"], "for --dense-above: must be a density in (0, 1]"),
    (["--dense-above", "1.2"], "for --dense-above: must be a density in (0, 1]"),
])
def test_cli_bad_inputs_name_the_option(tiny_dir, args, message):
    result = _cli([str(tiny_dir), "--device", "cpu", "--tokens", "300", "--samples", "1", *args])
    _assert_one_line_error(result, message)


def _assert_one_line_error(result, *words):
    """The CLI prints a user error as one line (no traceback) and exits non-zero."""
    text = " ".join(result.output.split())
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert all(w in text for w in words), result.output


def test_cli_too_short_user_file(tiny_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("A short note. " * 10)
    result = _cli([str(tiny_dir), "--device", "cpu", "--tokens", "600", "--data", str(tmp_path / "notes.txt"),
                   "--out", str(tmp_path / "t.safetensors")])
    _assert_one_line_error(result, "notes.txt", "fewer than --tokens 600")


def test_dense_above_makes_heads_over_the_break_even_dense(runner, tmp_path):
    kw = dict(samples=1, tokens=900, tau0=0.64, progress=False)
    tau, density = calib.calibrate(runner, 0.02, out=tmp_path / "off.safetensors", **kw)
    _, meta = thresholds_io.load(tmp_path / "off.safetensors")
    assert meta["dense_above"] == "1" and meta["dense_above_source"].startswith("not applied")  # CPU: off
    assert meta["dense_by_rule"] == "0"
    assert torch.equal(thresholds_io.load_density(tmp_path / "off.safetensors"), density)
    assert (density[tau == 0] == 1).all() and ((density > 0) & (density <= 1)).all()
    sparse = density[tau > 0]
    assert sparse.numel() >= 2 and sparse.min() < sparse.max(), "the test needs heads of different density"
    cut = sparse.median().item()
    ruled, ruled_density = calib.calibrate(runner, 0.02, out=tmp_path / "on.safetensors", dense_above=cut, **kw)
    expect = tau.clone()
    expect[(density > cut) & (tau > 0)] = 0
    assert torch.equal(ruled, expect) and (ruled == 0).sum() > (tau == 0).sum()
    assert (ruled_density[ruled == 0] == 1).all()
    _, meta = thresholds_io.load(tmp_path / "on.safetensors")
    assert meta["dense_above"] == f"{cut:g}" and meta["dense_above_source"] == "set by the user (--dense-above)"
    assert meta["dense_by_rule"] == str(int(((density > cut) & (tau > 0)).sum()))
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--dense-above must be a density in"):
            calib.calibrate(runner, 0.02, out=tmp_path / "bad.safetensors", dense_above=bad, **kw)


def test_default_dense_above_per_device():
    from sale_cli import break_even

    assert break_even.default_dense_above("cpu")[0] == 1.0
    points, source = break_even.MEASURED[break_even.FALLBACK]
    assert all(0 < v < 1 for v in points.values()) and "H200" in source
    pts = {1024: 0.2, 4096: 0.4}
    assert break_even.at_length(pts, 512) == 0.2 and break_even.at_length(pts, 8192) == 0.4
    assert break_even.at_length(pts, 2048) == pytest.approx(0.3)  # halfway in log2(tokens)
