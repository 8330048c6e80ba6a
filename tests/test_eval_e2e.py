"""End to end on CPU: a tiny random Llama runs LongBench and InfiniteBench fixtures, is interrupted, resumes,
is scored and summarized."""

import json
import shutil
from pathlib import Path

import pytest
import typer
from conftest import cpu_runner, save_tiny_model
from typer.testing import CliRunner

from sale_cli.commands import benchmarks, summarize
from sale_cli.eval import common, summary
from sale_cli.eval import infinitebench as ib
from sale_cli.eval import longbench as lb
from sale_cli.eval.metrics_longbench import score_dataset

FIXTURES = Path(__file__).parent / "fixtures"
LB_DATA, IB_DATA = FIXTURES / "longbench", FIXTURES / "infinitebench"
LB_SETS = ["narrativeqa", "trec", "samsum", "passage_count"]
IB_TASKS = ["passkey", "longbook_choice_eng", "math_find", "code_run"]
MAX_LENGTH = 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer (and chat template) trained on the fixtures."""
    text = "".join(f.read_text(encoding="utf-8") for f in sorted(FIXTURES.rglob("*.jsonl")))
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), text, max_positions=512, sharpen=1.0,
                           tokenizer_special_ids=True)


@pytest.fixture(scope="module")
def runner(model_dir):
    return cpu_runner(model_dir)


class Interrupting:
    """The runner, counting generate calls and raising KeyboardInterrupt at call `stop_at` (if given)."""

    def __init__(self, runner, stop_at=None):
        self._runner, self.calls, self.stop_at = runner, 0, stop_at

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self._runner.generate(*args, **kwargs)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _n_samples(data_dir: Path, name: str) -> int:
    return len((data_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines())


def test_longbench_interrupt_resume_score(runner, tmp_path):
    exp = tmp_path / "dense"
    first = Interrupting(runner, stop_at=5)
    with pytest.raises(KeyboardInterrupt):
        lb.run(first, exp, LB_SETS, LB_DATA, None, MAX_LENGTH)
    before = {d: _lines(exp / "longbench" / f"{d}.jsonl") for d in LB_SETS if (exp / "longbench" / f"{d}.jsonl").exists()}
    assert sum(len(v) for v in before.values()) == 4
    with open(exp / "longbench" / "trec.jsonl", "a", encoding="utf-8") as f:
        f.write('{"pred": "cut sho')  # a write torn by the interruption

    second = Interrupting(runner)
    lb.run(second, exp, LB_SETS, LB_DATA, None, MAX_LENGTH)
    total = sum(_n_samples(LB_DATA, d) for d in LB_SETS)
    assert second.calls == total - 4  # nothing finished is recomputed
    for d in LB_SETS:
        recs = _lines(exp / "longbench" / f"{d}.jsonl")
        assert len(recs) == _n_samples(LB_DATA, d) and len({r["_id"] for r in recs}) == len(recs)
        assert recs[: len(before.get(d, []))] == before.get(d, [])  # nothing finished is lost
        for r in recs:
            assert {"pred", "answers", "all_classes", "length", "_id", "input_tokens", "attn_ms", "density"} <= set(r)
            assert r["input_tokens"] <= MAX_LENGTH - lb.MAX_NEW_TOKENS[d]
            assert r["density"] == pytest.approx(1.0)
    lb.run(second, exp, LB_SETS, LB_DATA, None, MAX_LENGTH)
    assert second.calls == total - 4  # a finished run does nothing more

    result = lb.BENCH.score(exp)
    assert list(result) == [*[d for d in lb.ALL_DATASETS if d in LB_SETS], "average"]
    assert json.loads((exp / "longbench" / "result.json").read_text()) == result
    recs = _lines(exp / "longbench" / "trec.jsonl")
    assert result["trec"] == score_dataset("trec", [r["pred"] for r in recs], [r["answers"] for r in recs],
                                           recs[0]["all_classes"])
    assert result["average"] == round(sum(result[d] for d in LB_SETS) / len(LB_SETS), 2)


def test_longbench_prompts(runner):
    sample = json.loads((LB_DATA / "narrativeqa.jsonl").read_text(encoding="utf-8").splitlines()[0])
    chat = lb.prepare(runner, sample, "narrativeqa", 10_000)
    text = runner.tokenizer.decode(chat.input_ids)
    assert text.startswith("<|bos|><|user|>\nYou are given a story") and text.endswith("Answer:\n<|assistant|>\n")
    assert text.count("<|bos|>") == 1
    trec = json.loads((LB_DATA / "trec.jsonl").read_text(encoding="utf-8").splitlines()[0])
    plain = lb.prepare(runner, trec, "trec", 10_000)
    assert runner.tokenizer.decode(plain.input_ids).startswith("Please determine the type")  # no chat template
    cut = lb.prepare(runner, sample, "narrativeqa", 60)
    decoded = runner.tokenizer.decode(cut.input_ids)
    assert "You are given a story" in decoded and "Answer:" in decoded and len(cut.input_ids) < len(chat.input_ids)
    assert lb.prepare(runner, sample, "samsum", 10_000).stop_on_newline


def test_infinitebench_run_and_score(runner, tmp_path):
    exp = tmp_path / "ib"
    first = Interrupting(runner, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        ib.run(first, exp, IB_TASKS, IB_DATA, None, 300, "yarn_mistral")
    again = Interrupting(runner)
    ib.run(again, exp, IB_TASKS, IB_DATA, None, 300, "yarn_mistral")
    total = sum(_n_samples(IB_DATA, t) for t in IB_TASKS)
    assert again.calls == total - 2
    choice = _lines(exp / "infinitebench" / "preds_longbook_choice_eng.jsonl")
    assert [r["ground_truth"] for r in choice] == [["On the copper bridge", "B"], ["A lantern", "D"]]
    assert {"id", "prediction", "ground_truth", "input_tokens", "attn_ms", "density"} <= set(choice[0])
    result = ib.BENCH.score(exp)
    assert set(result) == {*IB_TASKS, "average"} and all(0 <= v <= 100 for v in result.values())


def test_infinitebench_prompts():
    mf = json.loads((IB_DATA / "math_find.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt = ib.build_prompt(mf, "math_find", "yarn_mistral")
    # "The largest number of" lower-cased, its last three characters " of" cut
    assert prompt.startswith("What is the largest number in the following list?\n\n[")
    cr = json.loads((IB_DATA / "code_run.jsonl").read_text(encoding="utf-8").splitlines()[1])
    assert ib.build_prompt(cr, "code_run", "yarn_mistral").endswith(
        "Please compute the exact value of func_7(-2). The value of func_7(-2) is")
    ch = json.loads((IB_DATA / "longbook_choice_eng.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert ib.build_prompt(ch, "longbook_choice_eng", "gpt4").endswith("C. By the river\nD. Nowhere")


def test_data_parallel_shards_merge(runner, tmp_path, monkeypatch):
    exp = tmp_path / "dp"
    for rank in (0, 1):
        monkeypatch.setattr(common, "rank_world", lambda r=rank: (r, 2))
        ib.run(runner, exp, ["passkey"], IB_DATA, None, 300, "yarn_mistral")
    shards = sorted(p.name for p in (exp / "infinitebench").glob("*.jsonl"))
    assert shards == ["preds_passkey.rank0.jsonl", "preds_passkey.rank1.jsonl"]
    assert [r["id"] for r in _lines(exp / "infinitebench" / "preds_passkey.rank1.jsonl")] == [1]
    scored_from_shards = ib.BENCH.score(exp, write=False)
    ib.BENCH.consolidate(exp)
    assert sorted(p.name for p in (exp / "infinitebench").glob("*.jsonl")) == ["preds_passkey.jsonl"]
    assert sorted(r["id"] for r in _lines(exp / "infinitebench" / "preds_passkey.jsonl")) == [0, 1, 2]
    assert ib.BENCH.score(exp, write=False) == scored_from_shards


def _cli() -> typer.Typer:
    app = typer.Typer()
    for fn in (benchmarks.longbench, benchmarks.infinitebench, summarize.summarize):
        app.command()(fn)
    return app


def test_cli_run_eval_only_errors_and_summarize(model_dir, tmp_path):
    cli, res_dir = CliRunner(), tmp_path / "results"
    common_args = [str(model_dir), "--results-dir", str(res_dir), "--max-length", str(MAX_LENGTH),
                   "--device", "cpu", "--dtype", "float32", "--limit", "2"]
    out = cli.invoke(_cli(), ["longbench", *common_args, "--exp", "dense", "--datasets", "trec,passage_count",
                              "--data-dir", str(LB_DATA)])
    assert out.exit_code == 0, out.output
    assert set(json.loads((res_dir / "dense/longbench/result.json").read_text())) == {"trec", "passage_count",
                                                                                       "average"}
    out = cli.invoke(_cli(), ["infinitebench", *common_args, "--exp", "dense", "--tasks", "passkey",
                              "--data-dir", str(IB_DATA)])
    assert out.exit_code == 0, out.output

    # a second experiment: same predictions, one of them changed, rescored with --eval-only
    shutil.copytree(res_dir / "dense", res_dir / "other")
    path = res_dir / "other/longbench/trec.jsonl"
    recs = _lines(path)
    recs[0]["pred"] = recs[0]["answers"][0]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    out = cli.invoke(_cli(), ["longbench", "--exp", "other", "--results-dir", str(res_dir), "--eval-only"])
    assert out.exit_code == 0, out.output
    other = json.loads((res_dir / "other/longbench/result.json").read_text())
    assert other["trec"] >= 50.0

    out = cli.invoke(_cli(), ["longbench", *common_args, "--exp", "dense", "--datasets", "trec",
                              "--data-dir", str(LB_DATA), "--max-length", "300"])
    assert out.exit_code == 1 and "--exp" in out.output and "max_length" in out.output
    out = cli.invoke(_cli(), ["longbench", *common_args, "--exp", "x", "--datasets", "nope"])
    assert out.exit_code == 1 and "--datasets: unknown nope" in out.output

    out = cli.invoke(_cli(), ["summarize", "--results-dir", str(res_dir)])
    assert out.exit_code == 0, out.output
    table = (res_dir / "summary.csv").read_text().splitlines()
    assert table[0] == "benchmark,dataset,dense,other"
    rows = {tuple(line.split(",")[:2]): line.split(",")[2:] for line in table[1:]}
    assert float(rows[("longbench", "trec")][1]) == other["trec"]
    assert ("infinitebench", "passkey") in rows and ("longbench", summary.DENSITY_ROW) in rows
    assert float(rows[("longbench", summary.DENSITY_ROW)][0]) == 1.0
    assert (res_dir / "summary.md").read_text().startswith("| benchmark | dataset | dense | other |")
    assert (res_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_data_explains_where_to_put_it(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match=r"data\.zip.*narrativeqa\.jsonl"):
        lb.load_samples("narrativeqa", tmp_path)
    with pytest.raises(FileNotFoundError, match="passkey.jsonl"):
        ib.load_samples("passkey", tmp_path)


def test_official_prediction_files_without_ids_are_scored(tmp_path):
    """Files written by LongBench's own pred.py carry no `_id`: --eval-only scores every line of them."""
    folder = tmp_path / "exp" / "longbench"
    folder.mkdir(parents=True)
    rows = [{"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 10},
            {"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 12},
            {"pred": "Lyon", "answers": ["Paris"], "all_classes": None, "length": 11}]
    (folder / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lb.BENCH.score(tmp_path / "exp", ["hotpotqa"]) == {"hotpotqa": 66.67, "average": 66.67}
