"""LongBench scorers against hand-computed values of the official metrics.py / eval.py behaviour."""

import pytest

from sale_cli.eval import metrics_longbench as M

TREC_CLASSES = ["Abbreviation", "Animal", "Color", "Date", "Individual", "City"]


def test_normalize_answer():
    assert M.normalize_answer("The Cat, a   dog! An apple.") == "cat dog apple"
    assert M.normalize_answer("theater") == "theater"  # articles only as whole words


def test_normalize_zh_answer():
    assert M.normalize_zh_answer("北京， 是 首都。ABC!") == "北京是首都abc"


def test_qa_f1_partial_and_zero():
    # pred tokens [cat, sat], gt [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3
    assert M.qa_f1_score("The cat sat.", "cat sat on the mat") == pytest.approx(2 / 3)
    assert M.qa_f1_score("dog", "cat") == 0
    # repeated tokens count by multiplicity: pred [a1, a1], gt [a1]: common 1, P = 1/2, R = 1, F1 = 2/3
    assert M.qa_f1_score("a1 a1", "a1") == pytest.approx(2 / 3)


def test_qa_f1_zh_uses_jieba_words():
    pytest.importorskip("jieba")
    # jieba: 我 / 爱 / 北京 against 北京: P = 1/3, R = 1, F1 = 1/2
    assert M.qa_f1_zh_score("我爱北京", "北京") == pytest.approx(0.5)
    # the full stop is its own token, emptied by normalization and dropped
    assert M.qa_f1_zh_score("北京。", "北京") == pytest.approx(1.0)


def test_rouge_l_f_and_its_quirks():
    pytest.importorskip("rouge")
    # one sentence, LCS(a b c d, a c d e) = 3 of 4 words each way: F = 0.75 (the package adds 1e-8)
    assert M.rouge_score("a b c d", "a c d e") == pytest.approx(0.75, abs=1e-6)
    # the `rouge` package counts distinct words: {a, b} on both sides and LCS 2, so F = 1
    assert M.rouge_score("a a b", "a b b") == pytest.approx(1.0, abs=1e-6)
    # an empty prediction makes the package raise; the official fallback is 0
    assert M.rouge_score("", "anything") == 0.0


def test_rouge_zh_over_jieba_words():
    pytest.importorskip("jieba")
    pytest.importorskip("rouge")
    # 我/爱/北京 against 他/爱/上海: LCS 1 of 3 each way, F = 1/3
    assert M.rouge_zh_score("我爱北京", "他爱上海") == pytest.approx(1 / 3, abs=1e-6)
    assert M.rouge_zh_score("我爱北京", "我爱北京") == pytest.approx(1.0, abs=1e-6)


def test_count_score():
    assert M.count_score("There are 5 unique paragraphs, not 6.", 5) == 0.5
    assert M.count_score("5", "5") == 1.0
    assert M.count_score("no idea", "5") == 0.0


def test_retrieval_scores():
    assert M.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    # digits of the prediction: 1 and 12; only 12 matches
    assert M.retrieval_score("Paragraph 1 or Paragraph 12", "Paragraph 12") == 0.5
    assert M.retrieval_score("I cannot tell", "Paragraph 3") == 0.0
    assert M.retrieval_zh_score("答案是段落3", "段落3") == 1.0
    assert M.retrieval_zh_score("段落3和段落30", "段落3") == 0.5


def test_code_sim_first_plain_line():
    # lines with ``` or # are skipped; the first plain line is compared
    assert M.code_sim_score("```python\n# add\nx = foo(1)\n```", "x = foo(1)") == 1.0
    # leading newlines are stripped; difflib blocks "return a", "+", "b": 2*10/22 = 0.909 -> 91
    assert M.code_sim_score("\n\nreturn a+b", "return a + b") == 0.91
    # no line qualifies -> empty prediction -> 0
    assert M.code_sim_score("// only a comment", "return 1") == 0.0
    assert M.fuzz_ratio("", "") == 100


def test_code_sim_is_difflib_even_where_python_levenshtein_is_installed():
    # LongBench's requirements install fuzzywuzzy without python-Levenshtein, so fuzz.ratio runs on difflib.
    # "return x + 1" vs "d = e": one matching block ("e"), 2*1/17 = 0.118 -> 12 (Levenshtein.ratio would give 24)
    assert M.fuzz_ratio("return x + 1", "d = e") == 12
    assert M.code_sim_score("return x + 1", "d = e") == 0.12


def test_classification_basic_and_ties():
    assert M.classification_score("Animal", "Animal", all_classes=TREC_CLASSES) == 1.0
    assert M.classification_score("Animal or City", "City", all_classes=TREC_CLASSES) == 0.5
    assert M.classification_score("Color", "Animal", all_classes=TREC_CLASSES) == 0.0
    # no class in the prediction: 0 (the official difflib fallback is unreachable)
    assert M.classification_score("no idea", "Animal", all_classes=TREC_CLASSES) == 0.0


def test_classification_substring_removal_quirk():
    # "cat" is a substring of the truth "catfish" and is removed; "dog" stays: 1/2
    assert M.classification_score("catfish and dog", "catfish", all_classes=["cat", "catfish", "dog"]) == 0.5
    # removing "a" while iterating skips "ab", which stays although it is a substring too: 1/2, not 1
    assert M.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
    # Chinese class names (lsht)
    assert M.classification_score("体育新闻", "体育", all_classes=["体育", "财经", "娱乐"]) == 1.0


def test_first_line_rule_only_for_its_datasets():
    # trec: only the first line after leading newlines counts
    assert M.score_sample("trec", "\nAnimal\nCity", ["Animal"], TREC_CLASSES) == 1.0
    assert M.score_sample("trec", "\nCity\nAnimal", ["Animal"], TREC_CLASSES) == 0.0
    # triviaqa: the second line would match, the first line does not
    assert M.score_sample("triviaqa", "Paris\nLondon", ["London"], None) == 0.0
    # narrativeqa has no such rule: both lines are scored (tokens [paris, london] vs [london]: F1 = 2/3)
    assert M.score_sample("narrativeqa", "Paris\nLondon", ["London"], None) == pytest.approx(2 / 3)


def test_max_over_answers_and_dataset_rounding():
    assert M.score_sample("hotpotqa", "the dog", ["a cat", "dog"], None) == 1.0
    # scores 1, 0, 0: 100/3 = 33.33
    assert M.score_dataset("hotpotqa", ["dog", "x", "y"], [["dog"], ["dog"], ["dog"]], None) == 33.33
    # scores 2/3 and 1: 83.33
    assert M.score_dataset("passage_count", ["3 or 4 or 3", "3"], [[3], ["3"]], None) == 83.33


def test_score_dataset_errors_name_the_argument():
    with pytest.raises(ValueError, match="dataset"):
        M.score_dataset("nope", ["x"], [["x"]], None)
    with pytest.raises(ValueError, match="predictions"):
        M.score_dataset("trec", [], [], TREC_CLASSES)


def test_dataset_table_and_first_line_set_are_the_official_ones():
    # LongBench/eval.py dataset2metric, read from the official file
    qa = {"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"}
    expected = {**dict.fromkeys(qa, M.qa_f1_score), "multifieldqa_zh": M.qa_f1_zh_score,
                "dureader": M.rouge_zh_score, "vcsum": M.rouge_zh_score,
                **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], M.rouge_score),
                "trec": M.classification_score, "lsht": M.classification_score,
                "passage_retrieval_en": M.retrieval_score, "passage_retrieval_zh": M.retrieval_zh_score,
                "passage_count": M.count_score, "lcc": M.code_sim_score, "repobench-p": M.code_sim_score}
    assert M.DATASET2METRIC == expected
    assert M.FIRST_LINE_DATASETS == {"trec", "triviaqa", "samsum", "lsht"}


def test_normalize_removes_punctuation_before_articles():
    # official order: lower, punctuation, articles, whitespace: "a-team" -> "ateam" keeps its "a"
    assert M.normalize_answer("A-team") == "ateam"
    assert M.qa_f1_score("A-team", "ateam") == 1.0


def test_first_line_rule_for_samsum_and_lsht():
    pytest.importorskip("rouge")
    # samsum: the second line would match exactly; only "\n" is stripped before the split
    assert M.score_sample("samsum", "\n\nx y\na b", ["a b"], None) == 0.0
    assert M.score_sample("samsum", "\n\na b\nx y", ["a b"], None) == pytest.approx(1.0, abs=1e-6)
    assert M.score_sample("lsht", "财经\n体育", ["体育"], ["体育", "财经"]) == 0.0


def test_retrieval_without_paragraph_in_the_truth_raises_like_the_official_code():
    # official matches[0] on an empty list: IndexError (the official data always names a paragraph)
    with pytest.raises(IndexError):
        M.retrieval_score("Paragraph 1", "no paragraph here")


def test_bench_uses_last_all_classes_and_every_line(tmp_path):
    import json

    from sale_cli.eval import longbench as lb

    folder = tmp_path / "longbench"
    folder.mkdir()
    # official eval.py keeps the last record's all_classes and scores every line (no de-duplication by _id)
    rows = [{"pred": "Animal", "answers": ["Animal"], "all_classes": ["Color"], "length": 1, "_id": "a"},
            {"pred": "Animal", "answers": ["Animal"], "all_classes": TREC_CLASSES, "length": 1, "_id": "a"},
            {"pred": "City", "answers": ["Animal"], "all_classes": TREC_CLASSES, "length": 1, "_id": "b"}]
    (folder / "trec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lb.BENCH.score(tmp_path, ["trec"], write=False) == {"trec": 66.67, "average": 66.67}
