"""InfiniteBench scorers, equal to the official `src/compute_scores.py` (main branch, quirks included)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from sale_cli.eval.metrics_longbench import f1_score, normalize_answer, normalize_zh_answer

_RETRIEVAL_SEPARATORS = ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]
_MISSING_LABEL = "XXXXXXXXXX"  # what the official scorer reads for a record without a label


def _first(label: Any) -> Any:
    return label[0] if isinstance(label, list) else label


def _replace_all(text: str, chars: Sequence[str]) -> str:
    for c in chars:
        text = text.replace(c, " ")
    return text


def _squeeze_spaces(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def first_int_match(prediction: str) -> str:
    """The first run of digits in the prediction, or ''."""
    return next((item for item in re.split("[^0-9]", prediction) if item != ""), "")


def qa_f1_score(prediction: str, ground_truths: Sequence[str]) -> float:
    """Best English token F1 over the ground truths."""
    pred_tokens = normalize_answer(prediction).split()
    return max((f1_score(pred_tokens, normalize_answer(gt).split()) for gt in ground_truths), default=0.0)


def qa_f1_score_zh(prediction: str, ground_truths: Sequence[str]) -> float:
    """Best Chinese F1 over the ground truths, one character one token."""
    pred_chars = list(normalize_zh_answer(prediction))
    return max((f1_score(pred_chars, list(normalize_zh_answer(gt))) for gt in ground_truths), default=0.0)


def score_kv_retrieval(pred: str, label: Any) -> bool:
    """The value is one of the prediction's words (split on whitespace and some punctuation)."""
    return _first(label) in _replace_all(pred, _RETRIEVAL_SEPARATORS).split()


def score_first_int(pred: str, label: Any) -> bool:
    """The first integer of the prediction equals the label (passkey, number_string)."""
    return _first(label) == first_int_match(pred)


def score_code_run(pred: str, label: Any) -> bool:
    """The last word of the prediction, as an int, equals the label."""
    words = _replace_all(pred.strip(), ["\n", ".", "`", "'", '"', ":"]).split()
    if not words:
        return False
    try:
        return _first(label) == int(words[-1])
    except ValueError:
        return False


def score_code_debug(pred: str, label: Sequence[str]) -> bool:
    """Option letter or function name, found as the last lone letter A-J, at the start, or after a prefix."""
    fn_name, letter = label[0], label[1]
    pred = pred.strip()
    match = re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", pred)
    if match and match.group(0) == letter:
        return True
    pred = _squeeze_spaces(_replace_all(pred.strip(), ["\n", "`", "'", '"', "-", "*", "Option", "option"]))
    if pred.startswith(letter) or pred.startswith(fn_name):
        return True
    for prefix in ["answer is:", "is:", "answer:", "correct option is:"]:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1:]
        return rest.startswith(letter) or rest.startswith(fn_name)
    return False


def score_math_find(pred: str, label: Any) -> bool:
    """The first number of the prediction equals the label (int or float).

    Where the official scorer raises (a decimal number read against an int label) this counts as wrong.
    """
    label = _first(label)
    if not isinstance(label, int | float):
        raise ValueError(f"label: math_find expects an int or float label, got {type(label).__name__}")
    found = re.search(r"\d+\.\d+|\d+", pred)
    if found is None:
        return False
    text = found.group(0).strip()
    if isinstance(label, int):
        return text.isdigit() and int(text) == label
    return float(text) == label


def score_longdialogue(pred: str, label: Sequence[str]) -> bool:
    """Any of the names occurs in the upper-cased prediction."""
    pred = pred.strip().upper()
    return any(name.upper() in pred for name in label)


def score_longbook_choice(pred: str, label: Sequence[str]) -> bool:
    """Option letter (label holds [option text, letter]) by the official cascade of rules."""
    pred = pred.strip()
    match = re.search(r"\b[A-D]\b(?!.*\b[A-D]\b)", pred)
    if match and match.group(0) in label:
        return True
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = _squeeze_spaces(_replace_all(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]))
    for prefix in ["answer is:", "answer:", "answer is", "option is"]:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1:]
        return any(rest.startswith(s) for s in label)
    for word in pred.split():
        if word in "ABCD":
            return word in label
    return False


def score_longbook_sum(pred: str, label: Any) -> float:
    """ROUGE-Lsum F of `rouge_score` (no stemming), best over the references when label is a list."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    score = scorer.score_multi(label, pred) if isinstance(label, list) else scorer.score(label, pred)
    return score["rougeLsum"].fmeasure


def score_math_calc(pred: str, label: list) -> float:
    """Length of the correct prefix of the predicted running values, over the number of values."""
    if isinstance(label[0], list):
        label = label[0]
    pred_nums = [int(item) for item in re.split("[^0-9]", pred) if item != ""]
    correct = 0
    for expected, got in zip(label, pred_nums, strict=False):
        if expected != got:
            break
        correct += 1
    return correct / len(label)


TASK2SCORER: dict[str, Callable[[str, Any], float]] = {
    "kv_retrieval": score_kv_retrieval,
    "passkey": score_first_int,
    "number_string": score_first_int,
    "code_run": score_code_run,
    "code_debug": score_code_debug,
    "longdialogue_qa_eng": score_longdialogue,
    "longbook_qa_eng": qa_f1_score,
    "longbook_sum_eng": score_longbook_sum,
    "longbook_choice_eng": score_longbook_choice,
    "longbook_qa_chn": qa_f1_score_zh,
    "math_find": score_math_find,
    "math_calc": score_math_calc,
}


def ground_truth(sample: dict, task: str) -> Any:
    """The label the official harness stores: [answer, option letter] for choice tasks, else `answer`."""
    answer = sample["answer"]
    if task not in ("code_debug", "longbook_choice_eng"):
        return answer
    if isinstance(answer, str):
        return [answer, "ABCD"[sample["options"].index(answer)]]
    if isinstance(answer, list) and len(answer) == 1:
        return [answer[0], "ABCD"[sample["options"].index(answer[0])]]
    if isinstance(answer, list) and len(answer) == 2 and answer[1] in ("A", "B", "C", "D"):
        return answer
    raise ValueError(f"answer: unexpected {task} answer {answer!r} (id {sample.get('id')})")


def official_fields(records: Sequence[dict]) -> tuple[list[str], list[Any]]:
    """Predictions and labels of a predictions file, read the way the official `compute_scores.py` reads them.

    The label key is 'ground_truth', or 'label' when the first record has no 'ground_truth' (the official
    `eval_yarn_mistral.py` writes 'pred' and 'label'); a record without that key gets the official placeholder
    label. Each record's prediction is its 'prediction', else its 'pred'.
    """
    if not records:
        return [], []
    label_key = next((k for k in ("ground_truth", "label") if k in records[0]), None)
    if label_key is None:
        raise ValueError(f"records: no 'ground_truth' or 'label' field in {str(records[0])[:200]}")
    predictions = []
    for rec in records:
        pred_key = next((k for k in ("prediction", "pred") if k in rec), None)
        if pred_key is None:
            raise ValueError(f"records: no 'prediction' or 'pred' field in {str(rec)[:200]}")
        predictions.append(rec[pred_key])
    return predictions, [rec.get(label_key, _MISSING_LABEL) for rec in records]


def score_task(task: str, predictions: Sequence[str], labels: Sequence[Any]) -> float:
    """Mean per-sample score x 100, rounded to 2 decimals."""
    if task not in TASK2SCORER:
        raise ValueError(f"task: unknown InfiniteBench task {task!r}; known: {', '.join(TASK2SCORER)}")
    if not predictions:
        raise ValueError(f"predictions: none to score for {task!r}")
    scorer = TASK2SCORER[task]
    total = sum(float(scorer(p, y)) for p, y in zip(predictions, labels, strict=True))
    return round(100 * total / len(predictions), 2)
