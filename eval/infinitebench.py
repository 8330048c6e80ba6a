"""InfiniteBench: official data files, prompts and truncation, resumable generation, official scoring."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

from sale_cli.eval.common import (
    Benchmark,
    Prepared,
    Scored,
    encode_final,
    fetch_data,
    generate_all,
    load_data,
    load_spec,
    prompt_budget,
)
from sale_cli.eval.metrics_infinitebench import SCORERS, ground_truth, official_fields, score_task

_SPEC = load_spec("infinitebench.json")
MAX_NEW_TOKENS: dict[str, int] = _SPEC["max_new_tokens"]
TEMPLATES: dict[str, dict[str, str]] = _SPEC["templates"]
ALL_TASKS = list(MAX_NEW_TOKENS)
PAPER_TASKS = ["kv_retrieval", "longbook_choice_eng", "math_find", "longbook_qa_eng", "longdialogue_qa_eng"]
# Template sets: "yarn_mistral" is the official one for open models (plain completion, no chat template);
# "gpt4" holds the official instruction prompts, sent through the model's chat template.
CHAT_TEMPLATE_SETS = frozenset({"gpt4"})
HUB_REPO = "xinrongzhang2022/InfiniteBench"
KEY = "id"


def _download(task: str, data_dir: Path) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(HUB_REPO, f"{task}.jsonl", repo_type="dataset", local_dir=data_dir)


def _where(task: str, data_dir: Path) -> str:
    return f"Download {task}.jsonl from https://huggingface.co/datasets/{HUB_REPO} into {data_dir}/, or pass --data-dir."


def check_data(tasks: list[str], data_dir: Path) -> None:
    """Every task's file present (downloaded when missing and the hub answers), before a model is loaded."""
    for task in tasks:
        fetch_data(data_dir / f"{task}.jsonl", lambda t=task: _download(t, data_dir), _where(task, data_dir))


def load_samples(task: str, data_dir: Path, limit: int | None = None) -> list[dict]:
    """The official `<task>.jsonl` records (first `limit` of them), downloading the file if missing."""
    required = [KEY, "context", "input", "answer"]
    if task in ("code_debug", "longbook_choice_eng"):  # their labels are looked up among the options
        required.append("options")
    return load_data(data_dir / f"{task}.jsonl", lambda: _download(task, data_dir), _where(task, data_dir), limit,
                     required=required)


def build_prompt(sample: dict, task: str, template_set: str) -> str:
    """The official `create_prompt` for the hub's file format."""
    template = TEMPLATES[template_set][task]
    options = dict(zip(["OPTION_A", "OPTION_B", "OPTION_C", "OPTION_D"], sample.get("options") or [], strict=False))
    if task == "code_run":
        calls = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", sample["input"])
        if not calls:
            raise ValueError(f"code_run sample {sample.get(KEY)}: no 'func_N(x)' call in its input {sample['input']!r}")
        func_call = calls[0]
        return template.format(func=func_call.split("(")[0], func_call=func_call, context=sample["context"])
    if task == "code_debug":
        return template.format(context=sample["context"], **options)
    if task in ("longdialogue_qa_eng", "longbook_sum_eng", "math_calc"):
        return template.format(context=sample["context"])
    if task == "longbook_choice_eng":
        return template.format(question=sample["input"], context=sample["context"], **options)
    if task in ("longbook_qa_eng", "longbook_qa_chn"):
        return template.format(question=sample["input"], context=sample["context"])
    if task == "math_find":
        found = re.findall(r"The .+ of", sample["input"])
        if not found:
            raise ValueError(f"math_find sample {sample.get(KEY)}: no 'The ... of' in its input {sample['input']!r}")
        prefix = f"What is {found[0].lower()[:-3]} in the following list?"
        return template.format(prefix=prefix, context=sample["context"], input=sample["input"])
    return template.format(context=sample["context"], input=sample["input"])


def prepare(runner, sample: dict, task: str, template_set: str, budget: int) -> Prepared:
    """Official prompt, tokens middle-truncated to `budget` and decoded, then re-encoded (chat-formatted)."""
    tok = runner.tokenizer
    ids = tok(build_prompt(sample, task, template_set)).input_ids
    if len(ids) > budget:
        ids = ids[: budget // 2] + ids[-(budget // 2):]
    prompt = tok.decode(ids, skip_special_tokens=True)
    return Prepared(encode_final(runner, prompt, template_set in CHAT_TEMPLATE_SETS), MAX_NEW_TOKENS[task])


def run(runner, exp_dir: Path, tasks: list[str], data_dir: Path, limit: int | None, max_length: int | None,
        template_set: str) -> None:
    """Generate the missing predictions of each task (this rank's share)."""
    if template_set not in TEMPLATES:
        raise ValueError(f"--template: unknown {template_set!r}; choose from {', '.join(TEMPLATES)}")
    data = {task: load_samples(task, data_dir, limit) for task in tasks}  # every file present before any run
    for task, samples in data.items():
        budget = prompt_budget(runner, max_length, MAX_NEW_TOKENS[task], template_set in CHAT_TEMPLATE_SETS,
                               "--max-length")

        def record(sample: dict, res, task=task) -> dict:
            return {KEY: sample[KEY], "prediction": res.text, "ground_truth": ground_truth(sample, task)}

        generate_all(runner, samples, KEY, BENCH.predictions(exp_dir, task),
                     lambda s, t=task, b=budget: prepare(runner, s, t, template_set, b), record,
                     f"infinitebench/{task}")


REPEATED_ID = "id seen before: every line counted, as the official script does"


def _score_records(task: str, records: list[dict], scorer: str = "official") -> Scored:
    """Score every record (repeats too: the official denominator is the number of lines) with `scorer`."""
    score, warnings = score_task(task, *official_fields(records), scorer=scorer)
    ids = Counter(rec[KEY] for rec in records if KEY in rec)
    repeats = sum(n - 1 for n in ids.values())
    if repeats:
        warnings[REPEATED_ID] = repeats
    return Scored(score, warnings)


BENCH = Benchmark("infinitebench", ALL_TASKS, "preds_{}.jsonl", KEY, "--tasks", _score_records,
                  {"scorer": "official"})


def with_scorer(scorer: str) -> Benchmark:
    """The benchmark scored by `scorer` ('official' or 'minference'), which result.json then records."""
    if scorer not in SCORERS:
        raise ValueError(f"--scorer: unknown {scorer!r}; choose from {', '.join(SCORERS)}")
    return dataclasses.replace(BENCH, score_options={"scorer": scorer})
