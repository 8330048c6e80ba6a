"""LongBench v1 scorers, equal to the official `metrics.py` and `eval.py` (quirks included)."""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + ZH_PUNCTUATION)

# Datasets whose prediction is cut to its first line before scoring (official eval.py).
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, the articles a/an/the, and collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop ASCII and CJK punctuation, and remove all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ZH_PUNCT).split())


def _jieba_cut(text: str) -> list[str]:
    import jieba

    return list(jieba.cut(text, cut_all=False))


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token-bag F1 between two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """English QA F1 over whitespace tokens of the normalized strings."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Chinese QA F1 over jieba tokens, each normalized, empty ones dropped."""

    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(w) for w in _jieba_cut(text)) if t]

    return f1_score(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F of the `rouge` package; 0 where it raises (e.g. an empty prediction)."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F over jieba tokens joined by spaces."""
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == target for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of the integers in the prediction that equal the ground truth."""
    return _fraction_equal(prediction, str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of the integers in the prediction equal to N of the first 'Paragraph N' in the ground truth."""
    return _fraction_equal(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Chinese variant of `retrieval_score` ('段落N')."""
    return _fraction_equal(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` on its default difflib backend (LongBench's requirements)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Fuzzy similarity of the first prediction line free of '`', '#' and '//' to the ground truth."""
    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln),
        "",
    )
    return fuzz_ratio(line, ground_truth) / 100


def classification_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str], **_) -> float:
    """1/len(matches) if the ground truth is among the class names found in the prediction, else 0.

    Class names that are proper substrings of the ground truth are dropped from the matches the way the
    official loop does it: removing while iterating, so the entry after each removed one is not examined.
    The official fallback to difflib similarity is unreachable (it tests `list != 0`) and so is absent.
    """
    matches = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matches):
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}


def score_sample(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None) -> float:
    """Best score of one prediction over its answers, after the first-line rule where it applies."""
    metric = DATASET2METRIC[dataset]
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes))
    return best


def score_dataset(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                  all_classes: Sequence[str] | None) -> float:
    """Official dataset score: mean best score x 100, rounded to 2 decimals."""
    if dataset not in DATASET2METRIC:
        raise ValueError(f"dataset: unknown LongBench dataset {dataset!r}; known: {', '.join(DATASET2METRIC)}")
    if not predictions:
        raise ValueError(f"predictions: none to score for {dataset!r}")
    total = sum(score_sample(dataset, p, a, all_classes) for p, a in zip(predictions, answers, strict=True))
    return round(100 * total / len(predictions), 2)
