"""LongBench v1: official data files, prompts and truncation, resumable generation, official scoring."""

from __future__ import annotations

import string
import zipfile
from pathlib import Path

from sale_cli.eval.common import (
    Benchmark,
    Prepared,
    encode_final,
    fetch_data,
    generate_all,
    load_data,
    load_spec,
    prompt_budget,
)
from sale_cli.eval.metrics_longbench import score_dataset

_SPEC = load_spec("longbench.json")
PROMPTS: dict[str, str] = _SPEC["dataset2prompt"]
MAX_NEW_TOKENS: dict[str, int] = _SPEC["dataset2maxlen"]
ALL_DATASETS = list(PROMPTS)
PAPER_DATASETS = [
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "trec", "triviaqa", "samsum", "lsht", "passage_count", "passage_retrieval_en",
]
# Official pred.py: chat models do better without the chat template on these few-shot and code datasets.
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
HUB_REPO = "THUDM/LongBench"
KEY = "_id"


def _download(data_dir: Path) -> None:
    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(HUB_REPO, "data.zip", repo_type="dataset")
    data_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            name = Path(member).name
            if name.endswith(".jsonl") and Path(name).stem in PROMPTS:
                (data_dir / name).write_bytes(zf.read(member))


def _where(dataset: str, data_dir: Path) -> str:
    return (f"Download data.zip from https://huggingface.co/datasets/{HUB_REPO} and extract its "
            f"data/*.jsonl files (e.g. {dataset}.jsonl) into {data_dir}/, or pass --data-dir.")


def check_data(datasets: list[str], data_dir: Path) -> None:
    """Every dataset's file present (downloaded when missing and the hub answers), before a model is loaded."""
    for dataset in datasets:
        fetch_data(data_dir / f"{dataset}.jsonl", lambda: _download(data_dir), _where(dataset, data_dir))


def load_samples(dataset: str, data_dir: Path, limit: int | None = None) -> list[dict]:
    """The official `<dataset>.jsonl` records (first `limit` of them), downloading the set if missing."""
    return load_data(data_dir / f"{dataset}.jsonl", lambda: _download(data_dir), _where(dataset, data_dir), limit,
                     required=fields(dataset))


def fields(dataset: str) -> list[str]:
    """The fields a record of `dataset` needs: those of its prompt template and those kept in its predictions."""
    in_prompt = [name for _, name, _, _ in string.Formatter().parse(PROMPTS[dataset]) if name]
    return list(dict.fromkeys([*in_prompt, "answers", "all_classes", "length", KEY]))


def prepare(runner, sample: dict, dataset: str, budget: int) -> Prepared:
    """Official prompt, middle truncation of its tokens to `budget`, then the chat template (most datasets)."""
    tok = runner.tokenizer
    chat = dataset not in NO_CHAT_TEMPLATE
    prompt = PROMPTS[dataset].format(**sample)
    ids = tok(prompt).input_ids
    if len(ids) > budget:
        half = budget // 2
        prompt = (tok.decode(ids[:half], skip_special_tokens=True)
                  + tok.decode(ids[-half:], skip_special_tokens=True))
    return Prepared(encode_final(runner, prompt, chat), MAX_NEW_TOKENS[dataset], stop_on_newline=dataset == "samsum",
                    min_new_tokens=1 if dataset == "samsum" else 0)  # pred.py: min_length = prompt + 1 for samsum


def _record(sample: dict, res) -> dict:
    return {"pred": res.text, "answers": sample["answers"], "all_classes": sample["all_classes"],
            "length": sample["length"], KEY: sample[KEY]}


def run(runner, exp_dir: Path, datasets: list[str], data_dir: Path, limit: int | None,
        max_length: int | None) -> None:
    """Generate the missing predictions of each dataset (this rank's share)."""
    data = {name: load_samples(name, data_dir, limit) for name in datasets}  # every file present before any run
    for dataset, samples in data.items():
        budget = prompt_budget(runner, max_length, MAX_NEW_TOKENS[dataset], dataset not in NO_CHAT_TEMPLATE,
                               "--max-length")
        generate_all(runner, samples, KEY, BENCH.predictions(exp_dir, dataset),
                     lambda s, d=dataset, b=budget: prepare(runner, s, d, b), _record, f"longbench/{dataset}")


def _score_records(dataset: str, records: list[dict]) -> float:
    return score_dataset(dataset, [r["pred"] for r in records], [r["answers"] for r in records],
                         records[-1]["all_classes"])


BENCH = Benchmark("longbench", ALL_DATASETS, "{}.jsonl", KEY, "--datasets", _score_records)
