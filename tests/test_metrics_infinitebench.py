"""InfiniteBench scorers against hand-computed values of the official compute_scores.py behaviour."""

import json

import pytest

from sale_cli.eval import metrics_infinitebench as M

CHOICE = ["On the copper bridge", "B"]
DEBUG = ["repack_carchive", "B"]


def test_kv_retrieval_word_match():
    assert M.score_kv_retrieval('The value is "a1b2-c3".', ["a1b2-c3"])
    assert M.score_kv_retrieval("{a1b2-c3}", "a1b2-c3")
    assert not M.score_kv_retrieval("a1b2-c3x", ["a1b2-c3"])


def test_first_int_match_passkey_number_string():
    assert M.first_int_match("key: 0071 then 5") == "0071"
    assert M.score_first_int("The pass key is 71432. Remember", ["71432"])
    assert not M.score_first_int("714320", ["71432"])
    assert not M.score_first_int("first 12, then 71432", ["71432"])
    assert not M.score_first_int("none", ["71432"])


def test_code_run_last_word():
    assert M.score_code_run("The value is 42.", [42])
    assert M.score_code_run("`-7`", [-7])
    assert not M.score_code_run("42 is the answer", [42])  # last word is not a number
    assert not M.score_code_run("   ", [42])


def test_code_debug_cascade():
    assert M.score_code_debug("B", DEBUG)
    assert M.score_code_debug("A looks fine, the answer is: B", DEBUG)  # last lone letter
    assert M.score_code_debug("repack_carchive has the bug", DEBUG)  # function name first
    # last lone letter is A, yet the prediction starts with the right letter: official counts it right
    assert M.score_code_debug("B is suspicious, but A", DEBUG)
    assert not M.score_code_debug("I think option C", DEBUG)
    assert not M.score_code_debug("the answer is:", DEBUG)  # ends with the prefix


def test_math_find_first_number():
    assert M.score_math_find("88", [88])
    assert M.score_math_find("The answer is 88.", [88])
    assert not M.score_math_find("3.5 then 88", [88])  # first number is a decimal
    assert M.score_math_find("value 3.5", [3.5])
    assert not M.score_math_find("no number", [88])
    with pytest.raises(ValueError, match="label"):
        M.score_math_find("88", ["88"])


def test_longdialogue_any_name_in_upper_case():
    assert M.score_longdialogue("Stamp Paid", ["STAMP PAID"])
    assert M.score_longdialogue(" ecker.", ["ECKER", "COMMANDER BILL ECKER"])
    assert not M.score_longdialogue("BILL", ["ECKER", "COMMANDER BILL ECKER"])


def test_longbook_choice_cascade():
    assert M.score_longbook_choice("B", CHOICE)
    assert M.score_longbook_choice("I believe the answer is B.", CHOICE)  # last lone A-D letter
    assert not M.score_longbook_choice("A. In the meadow", CHOICE)  # first letter A
    assert M.score_longbook_choice("On the copper bridge", CHOICE)  # the option text itself
    assert M.score_longbook_choice("my answer is: On the copper bridge", CHOICE)  # after a prefix
    assert not M.score_longbook_choice("", CHOICE)
    # "AB" is a substring of "ABCD", so it is taken as the letter and is not in the label
    assert not M.score_longbook_choice("maybe AB", CHOICE)


def test_qa_f1_english_and_chinese():
    # tokens [copper, bridge] vs [on, copper, bridge]: P = 1, R = 2/3, F1 = 0.8
    assert M.qa_f1_score("The copper bridge", ["on the copper bridge", "river"]) == pytest.approx(0.8)
    assert M.qa_f1_score("anything", []) == 0.0
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
    assert M.score_math_calc("[1, 4, 9]", [1, 4, 8]) == pytest.approx(2 / 3)
    assert M.score_math_calc("1 4 8 10", [[1, 4, 8]]) == 1.0
    assert M.score_math_calc("3, -1", [3, -1]) == 0.5  # signs are dropped by the digit split


def test_ground_truth_labels():
    sample = {"id": 3, "answer": ["On the copper bridge"], "options": ["In the meadow", "On the copper bridge", "x", "y"]}
    assert M.ground_truth(sample, "longbook_choice_eng") == CHOICE
    assert M.ground_truth(sample, "longbook_qa_eng") == ["On the copper bridge"]
    assert M.ground_truth({"answer": ["f", "C"], "options": []}, "code_debug") == ["f", "C"]
    with pytest.raises(ValueError, match="answer"):
        M.ground_truth({"answer": ["a", "b", "c"], "options": []}, "code_debug")


def test_score_task_mean_times_100():
    assert M.score_task("passkey", ["1", "2", "3"], [["1"], ["1"], ["3"]]) == 66.67
    with pytest.raises(ValueError, match="task"):
        M.score_task("nope", ["x"], ["x"])


def test_official_fields_read_both_key_spellings():
    # official get_labels/get_preds: the label key comes from the first record ('ground_truth', else 'label'),
    # the prediction from each record ('prediction', else 'pred'); eval_yarn_mistral.py writes 'pred'/'label'
    yarn = [{"id": 0, "pred": " 71432.", "label": ["71432"]}, {"id": 1, "prediction": "5", "pred": "71432", "label": ["5"]}]
    assert M.official_fields(yarn) == ([" 71432.", "5"], [["71432"], ["5"]])
    # the first record fixes the key; a record without it gets the official placeholder label
    mixed = [{"id": 0, "prediction": "1", "ground_truth": ["1"]}, {"id": 1, "prediction": "2", "label": ["2"]}]
    assert M.official_fields(mixed) == (["1", "2"], [["1"], "XXXXXXXXXX"])
    assert M.score_task("passkey", *M.official_fields(mixed)) == 50.0
    with pytest.raises(ValueError, match="label"):
        M.official_fields([{"id": 0, "pred": "1"}])
    with pytest.raises(ValueError, match="pred"):
        M.official_fields([{"id": 0, "label": "1"}])


def test_bench_scores_a_pred_label_file(tmp_path):
    from sale_cli.eval import infinitebench as ib

    folder = tmp_path / "infinitebench"
    folder.mkdir()
    lines = [{"id": 0, "pred": " 71432.", "label": ["71432"]}, {"id": 1, "pred": "12", "label": ["71432"]},
             {"id": 2, "pred": "The pass key is 71432", "label": ["71432"]}]
    (folder / "preds_passkey.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert ib.BENCH.score(tmp_path, write=False) == {"passkey": 66.67, "average": 66.67}
