"""InfiniteBench scorers, rule for rule: the official `src/compute_scores.py` (OpenBMB/InfiniteBench, HEAD 88b3daa)
and MInference's variant of it (`experiments/infinite_bench/compute_scores.py`), which the SALE paper used.

Each scorer below is a re-implementation of one official function, quirks included; docs/SCORING.md lists the
rules. Two documented choices differ from the official code, and every sample they touch is counted in the
warnings that `score_task` returns:
- where the official code raises (an exception, an assert), the sample scores 0;
- kv_retrieval with a list label: the official `label in words` can never be true for a list, so the first
  element of the list is compared instead.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from sale_cli.eval.metrics_longbench import f1_score, normalize_answer, normalize_zh_answer

SCORERS = ("official", "minference")
_RETRIEVAL_SEPARATORS = ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]
_MINFERENCE_KV_SEPARATORS = [*_RETRIEVAL_SEPARATORS, "</s>", "The", "To"]
_CODE_RUN_SEPARATORS = ["\n", ".", "`", "'", '"', ":"]
_CODE_DEBUG_CLEAN = ["\n", "`", "'", '"', "-", "*", "Option", "option"]
_CODE_DEBUG_PREFIXES = ["answer is:", "is:", "answer:", "correct option is:"]
_CHOICE_CLEAN = ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]
_CHOICE_PREFIXES = ["answer is:", "answer:", "answer is", "option is"]
_MISSING_LABEL = "XXXXXXXXXX"  # what the official scorer reads for a record without a label
# Exceptions the official functions raise on odd input (a decimal for an int label, a non-list label, ...).
_OFFICIAL_RAISES = (ValueError, TypeError, IndexError, AttributeError, ZeroDivisionError, AssertionError, KeyError)
KV_LIST_LABEL = "list label, never equal to a word in the official code: its first element compared"


class Noted(NamedTuple):
    """A sample score given by a documented choice of ours; `reason` is counted in the warnings."""

    value: float
    reason: str


def _replace_all(text: str, chars: Sequence[str]) -> str:
    for c in chars:
        text = text.replace(c, " ")
    return text


def _squeeze_spaces(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _unwrap(label: Any) -> Any:
    return label[0] if isinstance(label, list) else label


def first_int_match(prediction: str) -> str:
    """The first run of digits in the prediction, or ''."""
    return next((item for item in re.split("[^0-9]", prediction) if item != ""), "")


def qa_f1_score(prediction: str, ground_truths: Sequence[str]) -> float:
    """Best English token F1 over the ground truths (a string label is iterated character by character)."""
    pred_tokens = normalize_answer(prediction).split()
    return max((f1_score(pred_tokens, normalize_answer(gt).split()) for gt in ground_truths), default=0.0)


def qa_f1_score_zh(prediction: str, ground_truths: Sequence[str]) -> float:
    """Best Chinese F1 over the ground truths, one character one token."""
    pred_chars = list(normalize_zh_answer(prediction))
    return max((f1_score(pred_chars, list(normalize_zh_answer(gt))) for gt in ground_truths), default=0.0)


def _kv_retrieval(pred: str, label: Any, separators: Sequence[str]) -> bool | Noted:
    words = _replace_all(pred, separators).split()
    if isinstance(label, list):
        return Noted(float(label[0] in words), KV_LIST_LABEL)
    return label in words


def score_kv_retrieval(pred: str, label: Any) -> bool | Noted:
    """The label is one of the words left after some punctuation becomes spaces."""
    return _kv_retrieval(pred, label, _RETRIEVAL_SEPARATORS)


def score_kv_retrieval_minference(pred: str, label: Any) -> bool | Noted:
    """As `score_kv_retrieval`, "</s>", "The" and "To" also becoming spaces (after the punctuation)."""
    return _kv_retrieval(pred, label, _MINFERENCE_KV_SEPARATORS)


def score_first_int(pred: str, label: Any) -> bool:
    """The first digit run of the prediction equals the (first) label, as strings (passkey, number_string)."""
    return _unwrap(label) == first_int_match(pred)


def score_code_run(pred: str, label: Any) -> bool:
    """The last word of the prediction, read by int(), equals the (first) label."""
    label = _unwrap(label)
    words = _replace_all(pred.strip(), _CODE_RUN_SEPARATORS).split()
    if not words:
        return False
    try:
        return label == int(words[-1])
    except Exception:  # the official code catches everything here
        return False


def _after_first_prefix(text: str, prefixes: Sequence[str], accept: Sequence[str]) -> bool | None:
    """Official prefix rule: the first prefix (in list order) found anywhere decides; one character after it
    is skipped and the rest must start with one of `accept`; a prediction ending with the prefix is wrong.
    None when no prefix occurs."""
    for prefix in prefixes:
        idx = text.find(prefix)
        if idx == -1:
            continue
        if len(text) < idx + len(prefix) + 1:
            return False
        rest = text[idx + len(prefix) + 1:]
        return any(rest.startswith(s) for s in accept)
    return None


def _code_debug(pred: str, label: Sequence[str], prefixes: Sequence[str]) -> bool:
    pred = pred.strip()
    letter, fn_name = label[1], label[0]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    cleaned = _squeeze_spaces(_replace_all(pred, _CODE_DEBUG_CLEAN))
    return bool(_after_first_prefix(cleaned, prefixes, [letter, fn_name]))


def score_code_debug(pred: str, label: Sequence[str]) -> bool:
    """Label [function name, letter]: right if the prediction starts "<letter>." or "<letter>:"; otherwise,
    after cleaning, only what follows the first answer prefix found counts."""
    return _code_debug(pred, label, _CODE_DEBUG_PREFIXES)


def score_code_debug_minference(pred: str, label: Sequence[str]) -> bool:
    """MInference lists no "correct option is:" prefix; "is:" is met first anyway, so the result is the same."""
    return _code_debug(pred, label, _CODE_DEBUG_PREFIXES[:3])


def _math_find(pred: str, label: Any, int_of: Callable[[str], int]) -> bool:
    label = _unwrap(label)
    if not isinstance(label, int | float):
        raise TypeError(f"Expected int or float, got {type(label)}")
    found = re.search(r"\d+\.\d+|\d+", pred)
    if found is None:
        return False
    text = found.group(0).strip()
    if isinstance(label, int):
        return int_of(text) == label
    return float(text) == label


def score_math_find(pred: str, label: Any) -> bool:
    """The first number of the prediction equals the label; for an int label it is read by int(), which
    raises on a decimal such as "3.5" (scored 0 and counted)."""
    return _math_find(pred, label, int)


def score_math_find_minference(pred: str, label: Any) -> bool:
    """As `score_math_find`, an int label compared with int(float(number)): "88.9" counts as 88."""
    return _math_find(pred, label, lambda text: int(float(text)))


def score_longdialogue(pred: str, label: Any) -> bool:
    """The first label, as given (not upper-cased), equals one whole upper-cased word of the prediction after
    some punctuation became spaces; a label of several words can never match."""
    label = label[0]
    words = [w.upper() for w in _replace_all(pred.strip(), _RETRIEVAL_SEPARATORS).split()]
    return label in words


def score_longbook_choice(pred: str, label: Sequence[str]) -> bool:
    """Label [option text, letter], by the official cascade: first character, whole prediction, answer
    prefixes after cleaning, then the first word that is a substring of "ABCD"."""
    pred = pred.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = _squeeze_spaces(_replace_all(pred, _CHOICE_CLEAN))
    decided = _after_first_prefix(pred, _CHOICE_PREFIXES, label)
    if decided is not None:
        return decided
    for word in pred.split():
        if word in "ABCD":
            return word in label
    return False


def score_longbook_sum(pred: str, label: Any) -> float:
    """ROUGE-Lsum F as HF `evaluate`'s "rouge" computes it (rouge_score, no stemmer); best reference of a list."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    score = scorer.score_multi(label, pred) if isinstance(label, list) else scorer.score(label, pred)
    return score["rougeLsum"].fmeasure


def _math_calc(pred: str, label: Any, unwrap_nested: bool) -> float:
    if not isinstance(label, list):
        raise AssertionError(f"Expected list, got {type(label)}")
    if unwrap_nested and isinstance(label[0], list):
        label = label[0]
    pred_nums = [int(item) for item in re.split("[^0-9]", pred) if item != ""]
    correct = 0
    for expected, got in zip(label, pred_nums, strict=False):
        if expected != got:
            break
        correct += 1
    return correct / len(label)


def score_math_calc(pred: str, label: list) -> float:
    """Length of the correct prefix of the predicted running values (signs dropped) over the label's length."""
    return _math_calc(pred, label, unwrap_nested=True)


def score_math_calc_minference(pred: str, label: list) -> float:
    """As `score_math_calc` without unwrapping a nested label [[...]], which then scores 0."""
    return _math_calc(pred, label, unwrap_nested=False)


OFFICIAL: dict[str, Callable[[str, Any], Any]] = {
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
MINFERENCE: dict[str, Callable[[str, Any], Any]] = {
    **OFFICIAL,
    "kv_retrieval": score_kv_retrieval_minference,
    "code_debug": score_code_debug_minference,
    "math_find": score_math_find_minference,
    "math_calc": score_math_calc_minference,
}
_TABLES = {"official": OFFICIAL, "minference": MINFERENCE}


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


def score_one(task: str, pred: Any, label: Any, scorer: str = "official") -> tuple[float, str | None]:
    """One sample's score and, where a documented choice of ours decided it, the reason to count."""
    fn = _TABLES[scorer][task]
    try:
        value = fn(pred, label)
    except _OFFICIAL_RAISES as err:
        return 0.0, f"{type(err).__name__} in the official code: scored 0"
    if isinstance(value, Noted):
        return value.value, value.reason
    return float(value), None


def score_task(task: str, predictions: Sequence[Any], labels: Sequence[Any],
               scorer: str = "official") -> tuple[float, dict[str, int]]:
    """Mean sample score x 100 over every prediction (rounded to 4 decimals), and the warning counts by reason."""
    if scorer not in _TABLES:
        raise ValueError(f"--scorer: unknown {scorer!r}; choose from {', '.join(SCORERS)}")
    if task not in OFFICIAL:
        raise ValueError(f"task: unknown InfiniteBench task {task!r}; known: {', '.join(OFFICIAL)}")
    if not predictions:
        raise ValueError(f"predictions: none to score for {task!r}")
    total, warnings = 0.0, Counter()
    for pred, label in zip(predictions, labels, strict=True):
        value, reason = score_one(task, pred, label, scorer)
        total += value
        if reason:
            warnings[reason] += 1
    return round(100 * total / len(predictions), 4), dict(warnings)
