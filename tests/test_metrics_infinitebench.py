"""InfiniteBench scorers against values worked out by hand from the official code.

Each expected value comes from reading OpenBMB/InfiniteBench `src/compute_scores.py` (HEAD 88b3daa) or
MInference's `experiments/infinite_bench/compute_scores.py`; the comment names the official rule a case takes.
"""

import json

import pytest
from typer.testing import CliRunner

from sale_cli.errors import UserError
from sale_cli.eval import infinitebench as ib
from sale_cli.eval import metrics_infinitebench as M

CHOICE = ["On the copper bridge", "B"]
DEBUG = ["repack_carchive", "B"]
RAISES = "{} in the official code: scored 0"


def both(task, pred, label):
    """(official, minference) score of one sample, warnings dropped."""
    return M.score_one(task, pred, label, "official")[0], M.score_one(task, pred, label, "minference")[0]


def test_kv_retrieval_whole_word_after_punctuation():
    # punctuation \n : " ' . , ? ! { } becomes spaces, then the label must equal one whole word
    assert M.score_kv_retrieval('The value is "a1b2-c3".', "a1b2-c3")
    assert M.score_kv_retrieval("{a1b2-c3}", "a1b2-c3")
    assert not M.score_kv_retrieval("a1b2-c3x", "a1b2-c3")  # a longer word
    assert not M.score_kv_retrieval("key-a1b2-c3", "a1b2-c3")  # '-' is no separator
    assert not M.score_kv_retrieval("", "a1b2-c3")


def test_kv_retrieval_minference_also_drops_eos_the_to():
    # MInference adds "</s>", "The", "To" to the separators (replaced after the punctuation)
    assert both("kv_retrieval", "a1b2-c3</s>", "a1b2-c3") == (0.0, 1.0)
    assert both("kv_retrieval", "Thea1b2-c3", "a1b2-c3") == (0.0, 1.0)
    assert both("kv_retrieval", "Toa1b2-c3", "a1b2-c3") == (0.0, 1.0)
    # ... which also cuts a value that contains "The": "Theta" becomes " ta"
    assert both("kv_retrieval", "Theta", "Theta") == (1.0, 0.0)


def test_kv_retrieval_list_label_is_our_counted_choice():
    # official `label in words` with a list label is never true; we compare its first element and count it
    for scorer in M.SCORERS:
        assert M.score_one("kv_retrieval", "a1b2-c3", ["a1b2-c3"], scorer) == (1.0, M.KV_LIST_LABEL)
        assert M.score_one("kv_retrieval", "zz", ["a1b2-c3"], scorer) == (0.0, M.KV_LIST_LABEL)
    assert M.score_one("kv_retrieval", "a1b2-c3", "a1b2-c3") == (1.0, None)


def test_first_int_match_passkey_number_string():
    assert M.first_int_match("key: 0071 then 5") == "0071"
    for task in ("passkey", "number_string"):
        assert both(task, "The pass key is 71432. Remember", ["71432"]) == (1.0, 1.0)  # label[0] of a list
        assert both(task, " 71432.", "71432") == (1.0, 1.0)  # a plain label
        assert both(task, "714320", ["71432"]) == (0.0, 0.0)  # the whole digit run
        assert both(task, "first 12, then 71432", ["71432"]) == (0.0, 0.0)  # only the first run
        assert both(task, "none", ["71432"]) == (0.0, 0.0)  # '' against the label
        assert both(task, "71432", [71432]) == (0.0, 0.0)  # string against int: never equal


def test_code_run_last_word_as_int():
    assert M.score_code_run("The value is 42.", [42])  # '.' becomes a space, last word 42
    assert M.score_code_run("`-7`", [-7])  # backticks become spaces, int('-7')
    assert M.score_code_run("x = 1_000", 1000)  # int() reads '1_000'
    assert not M.score_code_run("42 is the answer", [42])  # last word 'answer': int() fails, caught
    assert not M.score_code_run("   ", [42])  # no words
    assert not M.score_code_run("42", ["42"])  # int against a string label


@pytest.mark.parametrize(("pred", "expected", "rule"), [
    ("B. repack", True, "first two characters 'B.'"),
    ("  B: x", True, "first two characters 'B:' after strip"),
    ("B", False, "no '.'/':' after the letter and no prefix: wrong"),
    ("B is wrong", False, "no plain startswith(letter) rule"),
    ("repack_carchive has the bug", False, "no plain startswith(function) rule"),
    ("B is suspicious, but A", False, "no last-standalone-letter rule"),
    ("The answer is: B", True, "'answer is:' then one skipped character"),
    ("The answer is:B", False, "the character after the prefix is skipped: the rest is ''"),
    ("The answer is:", False, "prediction ends with the prefix"),
    ("It is: repack_carchive", True, "'is:' then the function name"),
    ("my answer: B", True, "'answer:'"),
    ("Answer: B", False, "prefixes are case sensitive"),
    ("The correct option is: B", True, "'option' cleaned away; 'is:' is found"),
    ('The answer is: "B"', True, "quotes become spaces, double spaces squeezed"),
    ("The answer is: Option B", True, "'Option' becomes a space"),
    ("The answer is: A, not B", False, "only what follows the first prefix counts"),
    ("It is: A, the answer is: B", True, "prefixes tried in list order, not text order"),
    ("A looks fine, the answer is: B", True, "'answer is:' then B"),
    ("-B.", False, "'-B' is not 'B.'; cleaned ' B.' has no prefix"),
    ("", False, "empty prediction: pred[:2] is '', no prefix"),
])
def test_code_debug_official_branches(pred, expected, rule):
    assert M.score_code_debug(pred, DEBUG) is expected, rule
    # MInference drops the 'correct option is:' prefix, unreachable behind 'is:': same result everywhere
    assert M.score_code_debug_minference(pred, DEBUG) is expected, rule


def test_math_find_first_number():
    assert both("math_find", "88", [88]) == (1.0, 1.0)
    assert both("math_find", "The answer is 88.", [88]) == (1.0, 1.0)
    assert both("math_find", "-88", [88]) == (1.0, 1.0)  # the sign is not part of the number
    assert both("math_find", "no number", [88]) == (0.0, 0.0)
    assert both("math_find", "value 3.5", [3.5]) == (1.0, 1.0)  # float label: float() of the first number
    assert both("math_find", "3.50", 3.5) == (1.0, 1.0)
    assert both("math_find", "3", [3.5]) == (0.0, 0.0)


def test_math_find_decimal_against_int_label():
    # official: int('3.5') raises ValueError -> our choice: 0, counted; MInference: int(float('3.5')) = 3
    assert M.score_one("math_find", "3.5 then 88", [88]) == (0.0, RAISES.format("ValueError"))
    assert M.score_one("math_find", "3.5 then 88", [88], "minference") == (0.0, None)
    assert M.score_one("math_find", "88.9", [88]) == (0.0, RAISES.format("ValueError"))
    assert M.score_one("math_find", "88.9", [88], "minference") == (1.0, None)
    # a string label: TypeError in both codes
    for scorer in M.SCORERS:
        assert M.score_one("math_find", "88", ["88"], scorer) == (0.0, RAISES.format("TypeError"))


@pytest.mark.parametrize(("pred", "label", "expected", "rule"), [
    (" ecker.", ["ECKER", "COMMANDER BILL ECKER"], True, "upper-cased word equals the first label"),
    ("Commander Bill Ecker", ["ECKER"], True, "any one whole word"),
    ("Stamp Paid", ["STAMP PAID"], False, "a label of two words never equals one word"),
    ("BILL", ["ECKER", "COMMANDER BILL ECKER"], False, "only the first label is used"),
    ("Ecker", ["JOHN", "ECKER"], False, "only the first label is used"),
    ("ECKERT", ["ECKER"], False, "no substring test"),
    ("Ecker:", ["ECKER"], True, "':' becomes a space"),
    ("{Ecker}", ["ECKER"], True, "braces become spaces"),
    ("Ecker's", ["ECKER"], True, "the apostrophe becomes a space: ECKER, S"),
    ("Ecker-Jones", ["ECKER"], False, "'-' is no separator"),
    ("Ecker", ["Ecker"], False, "the label is not upper-cased"),
    ("", ["ECKER"], False, "no words"),
])
def test_longdialogue_whole_word_rules(pred, label, expected, rule):
    assert both("longdialogue_qa_eng", pred, label) == (float(expected),) * 2, rule


def test_longdialogue_empty_label_raises_in_official_code():
    assert M.score_one("longdialogue_qa_eng", "ECKER", []) == (0.0, RAISES.format("IndexError"))


@pytest.mark.parametrize(("pred", "expected", "rule"), [
    ("B", True, "first character B is in the label"),
    ("B. On the copper bridge", True, "first character"),
    ("A. In the meadow", False, "first character A is not in the label"),
    ("Bridges matter; the answer is A", True, "first character B decides at once"),
    ("On the copper bridge", True, "the whole prediction equals the option text"),
    ("on the copper bridge", False, "case sensitive; no prefix; no word in 'ABCD'"),
    ("I believe the answer is B.", True, "'answer is' (after '.' became a space) then B"),
    ("my answer is: On the copper bridge", True, "'answer is:' then the option text"),
    ("the answer: b", False, "'answer:' then 'b': case sensitive"),
    ("the answer is C; answer: B", True, "prefixes tried in list order: 'answer:' before 'answer is'"),
    ("The option is C", False, "'option is' then C"),
    ("the answer is", False, "prediction ends with the prefix"),
    ("I think B is right", True, "first word inside 'ABCD' is B"),
    ("I think C is right", False, "first word inside 'ABCD' is C"),
    ("maybe AB", False, "'AB' is a substring of 'ABCD' and is not in the label"),
    ('my choice: "B"', True, "quotes become spaces, then the word B"),
    ("", False, "empty"),
    ("   ", False, "empty after strip"),
])
def test_longbook_choice_cascade(pred, expected, rule):
    assert both("longbook_choice_eng", pred, CHOICE) == (float(expected),) * 2, rule


def test_qa_f1_english_and_chinese():
    # tokens [copper, bridge] vs [on, copper, bridge]: P = 1, R = 2/3, F1 = 0.8
    assert M.qa_f1_score("The copper bridge", ["on the copper bridge", "river"]) == pytest.approx(0.8)
    assert M.qa_f1_score("anything", []) == 0.0
    # a string label is iterated character by character: 'x' against 'x', 'y', 'z' -> 1
    assert M.qa_f1_score("x", "xyz") == 1.0
    # one character one token: 北京市 vs 北京: P = 2/3, R = 1, F1 = 0.8
    assert M.qa_f1_score_zh("北京市。", ["北京"]) == pytest.approx(0.8)


def test_longbook_sum_rouge_lsum():
    pytest.importorskip("rouge_score")
    # one sentence, LCS 2 of 3 tokens each way: F = 2/3
    assert M.score_longbook_sum("a b c", ["a b d"]) == pytest.approx(2 / 3)
    # ROUGE-Lsum treats lines as sentences, so their order does not matter
    assert M.score_longbook_sum("the cat sat\nthe dog ran", "the dog ran\nthe cat sat") == pytest.approx(1.0)
    # best over several references
    assert M.score_longbook_sum("a b c", ["x y z", "a b c"]) == pytest.approx(1.0)


def test_math_calc_correct_prefix():
    assert both("math_calc", "[1, 4, 9]", [1, 4, 8]) == pytest.approx((2 / 3, 2 / 3))
    assert both("math_calc", "3, -1", [3, -1]) == (0.5, 0.5)  # signs are dropped by the digit split
    # a nested label: official unwraps it; MInference compares a list with ints and scores 0
    assert both("math_calc", "1 4 8 10", [[1, 4, 8]]) == (1.0, 0.0)
    # not a list: the official assert fails
    assert M.score_one("math_calc", "1", 1) == (0.0, RAISES.format("AssertionError"))
    # an empty label: official label[0] raises; MInference divides by zero
    assert M.score_one("math_calc", "1", []) == (0.0, RAISES.format("IndexError"))
    assert M.score_one("math_calc", "1", [], "minference") == (0.0, RAISES.format("ZeroDivisionError"))


def test_a_prediction_that_is_not_text_is_counted():
    assert M.score_one("passkey", None, ["1"]) == (0.0, RAISES.format("TypeError"))
    assert M.score_one("code_debug", None, DEBUG) == (0.0, RAISES.format("AttributeError"))


def test_ground_truth_labels():
    sample = {"id": 3, "answer": ["On the copper bridge"], "options": ["In the meadow", "On the copper bridge", "x", "y"]}
    assert M.ground_truth(sample, "longbook_choice_eng") == CHOICE
    assert M.ground_truth(sample, "longbook_qa_eng") == ["On the copper bridge"]
    assert M.ground_truth({"answer": ["f", "C"], "options": []}, "code_debug") == ["f", "C"]
    with pytest.raises(ValueError, match="answer"):
        M.ground_truth({"answer": ["a", "b", "c"], "options": []}, "code_debug")


def test_score_task_mean_over_every_prediction_4_decimals():
    assert M.score_task("passkey", ["1", "2", "3"], [["1"], ["1"], ["3"]]) == (66.6667, {})
    # 60 right of 350: 17.1429 (not 60/349 = 17.1920)
    preds = ["88"] * 60 + ["7"] * 290
    assert M.score_task("math_find", preds, [[88]] * 350) == (17.1429, {})
    # a sample where the official code raises is in the denominator and is counted
    assert M.score_task("math_find", ["3.5", "88"], [[88], [88]]) == (50.0, {RAISES.format("ValueError"): 1})
    assert M.score_task("math_find", ["3.5", "88"], [[88], [88]], "minference") == (50.0, {})
    with pytest.raises(ValueError, match="task"):
        M.score_task("nope", ["x"], ["x"])
    with pytest.raises(ValueError, match="--scorer"):
        M.score_task("passkey", ["x"], ["x"], "other")


def test_official_fields_read_both_key_spellings():
    # official get_labels/get_preds: the label key comes from the first record ('ground_truth', else 'label'),
    # the prediction from each record ('prediction', else 'pred'); eval_yarn_mistral.py writes 'pred'/'label'
    yarn = [{"id": 0, "pred": " 71432.", "label": ["71432"]}, {"id": 1, "prediction": "5", "pred": "71432", "label": ["5"]}]
    assert M.official_fields(yarn) == ([" 71432.", "5"], [["71432"], ["5"]])
    # the first record fixes the key; a record without it gets the official placeholder label
    mixed = [{"id": 0, "prediction": "1", "ground_truth": ["1"]}, {"id": 1, "prediction": "2", "label": ["2"]}]
    assert M.official_fields(mixed) == (["1", "2"], [["1"], "XXXXXXXXXX"])
    assert M.score_task("passkey", *M.official_fields(mixed)) == (50.0, {})
    with pytest.raises(ValueError, match="label"):
        M.official_fields([{"id": 0, "pred": "1"}])
    with pytest.raises(ValueError, match="pred"):
        M.official_fields([{"id": 0, "label": "1"}])


def _write(folder, task, lines, end="\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"preds_{task}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + end)


def test_bench_scores_every_line_like_the_official_script(tmp_path):
    folder = tmp_path / "infinitebench"
    lines = [{"id": 0, "pred": " 71432.", "label": ["71432"]}, {"id": 1, "pred": "12", "label": ["71432"]},
             {"id": 2, "pred": "The pass key is 71432", "label": ["71432"]}]
    _write(folder, "passkey", lines, end="")  # no newline after the last line: it still counts
    assert ib.BENCH.score(tmp_path, write=False) == {"passkey": 66.6667, "average": 66.67}
    # a repeated id is counted each time, as the official script does, and reported
    _write(folder, "passkey", [*lines, lines[1]])
    assert ib.BENCH.score(tmp_path) == {"passkey": 50.0, "average": 50.0}
    written = json.loads((folder / "result.json").read_text())
    assert written["scorer"] == "official" and written["warnings"] == {"passkey": {ib.REPEATED_ID: 1}}
    # a last line cut short by an interruption is ignored; a broken line inside the file is an error
    (folder / "preds_passkey.jsonl").write_text(json.dumps(lines[0]) + "\n" + '{"id": 1, "pr')
    assert ib.BENCH.score(tmp_path, write=False)["passkey"] == 100.0
    (folder / "preds_passkey.jsonl").write_text('{"id": 1, "pr\n' + json.dumps(lines[0]) + "\n")
    with pytest.raises(UserError, match=r"preds_passkey\.jsonl:1"):
        ib.BENCH.score(tmp_path, write=False)


def test_cli_eval_only_with_minference_scorer(tmp_path):
    from sale_cli.cli import app

    folder = tmp_path / "res" / "X" / "infinitebench"
    _write(folder, "math_find", [{"id": 0, "prediction": "88.9", "ground_truth": [88]},
                                 {"id": 1, "prediction": "7", "ground_truth": [88]}])
    _write(folder, "kv_retrieval", [{"id": 0, "prediction": "Thea1b2", "ground_truth": "a1b2"}])
    base = ["infinitebench", "--exp", "X", "--results-dir", str(tmp_path / "res"), "--eval-only"]

    out = CliRunner().invoke(app, [*base, "--scorer", "minference"])
    assert out.exit_code == 0, out.output
    result = json.loads((folder / "result.json").read_text())
    assert result == {"kv_retrieval": 100.0, "math_find": 50.0, "average": 75.0, "scorer": "minference",
                      "warnings": {}}

    out = CliRunner().invoke(app, base)  # default: official
    assert out.exit_code == 0, out.output
    result = json.loads((folder / "result.json").read_text())
    assert result == {"kv_retrieval": 0.0, "math_find": 0.0, "average": 0.0, "scorer": "official",
                      "warnings": {"math_find": {RAISES.format("ValueError"): 1}}}

    out = CliRunner().invoke(app, [*base, "--scorer", "nope"])
    assert out.exit_code != 0 and "--scorer" in out.output
