"""Rule-based rewards: the shipped functions, loading --reward_funcs, and every way a function can fail."""
from __future__ import annotations

import json
import os

import pytest

from conftest import DATA
from utils.data import load_samples
from utils.errors import UserError
from utils.reward_funcs import (RewardFunc, answer_format, call_reward_func, exact_match, final_number,
                                load_reward_funcs, overlong_penalty, overlong_penalty_with, regex_reward,
                                score_with_funcs)


def call(fn, completions, **columns):
    n = len(completions)
    return fn(prompts=["q"] * n, completions=completions, **columns)


# ----------------------------------------------------------------------------- shipped functions

def test_exact_match_compares_the_final_numbers():
    completions = ["The answer is 7.", "The answer is 17.", "7 plus 1 is 8, so the answer is 7", "no idea",
                   "The answer is 7.0.", "It is 1,234.", "-3", "The answer is 4."]
    answers = ["7", "7", 7, "7", "7", "1234", "-3", "the count is 4"]
    assert call(exact_match, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert final_number("a 3 b 12.5 c") == final_number("12.50") and final_number("none") is None
    with pytest.raises(ValueError, match="has no number"):
        call(exact_match, ["1"], answer=["seven"])


def test_format_rewards():
    got = call(answer_format, ["The answer is 3.", "Let me count: 1 2 3. The answer is 3.", " The answer is 3. ",
                               "The answer is 3", "The answer is three.", "The answer is 3. Done."])
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    well_formed = regex_reward(r"The \w+ is \w+\.", "well_formed")
    assert well_formed.__name__ == "well_formed"
    assert call(well_formed, ["The cat is great.", "The cat is very great.", "The cat is great. The"]) == [1.0, 0.0, 0.0]


def test_overlong_penalty_is_dapo_soft_punishment():
    # Budget 8 with the default soft zone of 8 // 4 = 2 tokens: 0 up to 6 tokens, -0.5 at 7, -1 at 8.
    ids = [[1] * n for n in (3, 6, 7, 8)]
    assert call(overlong_penalty, ["x"] * 4, completion_ids=ids, max_completion_length=8) == [0.0, 0.0, -0.5, -1.0]
    four = overlong_penalty_with(cache=4)
    assert call(four, ["x"] * 4, completion_ids=ids, max_completion_length=8) == [0.0, -0.5, -0.75, -1.0]


def test_shipped_preference_rewards():
    funcs = load_reward_funcs([os.path.join(DATA, "rewards.py") + ":warm_word",
                               os.path.join(DATA, "rewards.py") + ":well_formed"], ["1", "0.5"])
    answers = ["The apple is great.", " The turtle is dull.", "great great", "The o is amazing.", "The apple is big."]
    total, per = score_with_funcs(funcs, ["p"] * 5, answers, [{}] * 5, [[1]] * 5, 16, [f"a:{i}" for i in range(5)])
    # well_formed wants a noun and an adjective of the task: "The o is amazing." is the hack it closes
    assert per == {"warm_word": [1.0, 0.0, 1.0, 1.0, 0.0], "well_formed": [1.0, 1.0, 0.0, 0.0, 0.0]}
    assert total == [1.5, 0.5, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- loading

def test_load_by_module_and_by_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("from helper import BONUS\n"
                 "def bonus(prompts, completions, **kw):\n    return [BONUS] * len(completions)\n")
    (tmp_path / "helper.py").write_text("BONUS = 2.0\n")  # the file's directory is importable while it loads
    funcs = load_reward_funcs(["utils.reward_funcs:exact_match", f"{f}:bonus"], [])
    assert [(x.name, x.weight) for x in funcs] == [("exact_match", 1.0), ("bonus", 1.0)]
    assert funcs[1].fn(["p"], ["c"]) == [2.0]


@pytest.mark.parametrize("specs, weights, message", [
    (["nocolon"], [], "expected FILE.py:NAME"),
    (["missing.py:f"], [], "'missing.py' does not exist"),
    (["utils.reward_funcs:nothing_here"], [], "has no 'nothing_here'"),
    (["utils.reward_funcs:RESERVED"], [], "not a function"),
    (["no_such_module_xyz:f"], [], "cannot import module"),
    (["utils.reward_funcs:exact_match"], ["1", "2"], "2 values for 1"),
    (["utils.reward_funcs:exact_match"], ["heavy"], "'heavy' is not a finite number"),
    (["utils.reward_funcs:exact_match", "utils.reward_funcs:exact_match"], [], "two functions are named"),
])
def test_load_errors_name_the_flag(specs, weights, message):
    with pytest.raises(UserError, match=message):
        load_reward_funcs(specs, weights)


def test_a_file_that_fails_to_load_is_reported(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("raise RuntimeError('half written')\n")
    with pytest.raises(UserError, match=r"broken.py:f: loading .* raised RuntimeError: half written"):
        load_reward_funcs([f"{f}:f"], [])


@pytest.mark.parametrize("tail,code", [("sys.exit(main())\n", "0"), ("args = argparse.ArgumentParser().parse_args()\n", "2")])
def test_a_file_that_exits_while_loading_is_reported(tmp_path, tail, code):
    """A file that is also a script (sys.exit(main()) or argparse at its top level) ended step 3 while
    loading: exit 0 having trained nothing, or argparse's usage of the other program, exit 2."""
    f = tmp_path / "scorer.py"
    f.write_text("import argparse, sys\n\ndef f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n\n"
                 "def main():\n    return 0\n\n" + tail)
    with pytest.raises(UserError, match=rf"^--reward_funcs {f}:f: loading '{f}' called sys.exit\({code}\) \(its top "
                                        r"level runs as a script"):
        load_reward_funcs([f"{f}:f"], [])


# ----------------------------------------------------------------------------- calling, and failing

def rf(fn, name="f"):
    return RewardFunc(f"mine.py:{name}", name, fn, 1.0)


WHERES = ["d.jsonl:1", "d.jsonl:1", "d.jsonl:2", "d.jsonl:2"]


def run(fn, completions=("a", "b", "c", "d"), columns=None):
    cols = columns or [{"answer": "1"}, {"answer": "1"}, {"answer": "2"}, {"answer": "2"}]
    return call_reward_func(rf(fn), ["p1", "p1", "p2", "p2"], list(completions), cols, [[1]] * 4, 8, WHERES)


def test_columns_arrive_as_lists_and_none_is_allowed():
    seen = {}

    def fn(prompts, completions, answer, extra, completion_ids, max_completion_length, **kw):
        seen.update(prompts=prompts, answer=answer, extra=extra, ids=completion_ids, max=max_completion_length)
        return [None, True, 0, 2.5]

    out = run(fn, columns=[{"answer": "1"}, {"answer": "1"}, {"answer": "2", "extra": 5}, {"answer": "2", "extra": 5}])
    assert out == [None, 1.0, 0.0, 2.5]
    assert seen == {"prompts": ["p1", "p1", "p2", "p2"], "answer": ["1", "1", "2", "2"], "extra": [None, None, 5, 5],
                    "ids": [[1]] * 4, "max": 8}
    total, per = score_with_funcs([rf(fn)], ["p"] * 4, ["a"] * 4, [{"answer": 1, "extra": 1}] * 4, [[1]] * 4, 8,
                                  WHERES)
    assert total == [0.0, 1.0, 0.0, 2.5]  # None adds nothing


def test_a_raising_function_names_itself_and_the_row_that_fails():
    def fn(prompts, completions, **kw):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on the empty answer

    with pytest.raises(UserError, match=r"mine.py:f raised ZeroDivisionError: .*prompt d.jsonl:2, answer ''"):
        run(fn, completions=["a", "b", "", "d"])


@pytest.mark.parametrize("returned, message", [
    ([1.0, 2.0], "returned 2 rewards for 4 completions"),
    (None, "returned NoneType, not a list"),
    ([1.0, float("nan"), 0.0, 0.0], r"returned nan for prompt d.jsonl:1; rewards must be finite"),
    ([1.0, 0.0, float("inf"), 0.0], r"returned inf for prompt d.jsonl:2"),
    ([1.0, 0.0, "high", 0.0], r"returned 'high' \(str\) for prompt d.jsonl:2"),
    # text float() reads was taken as the reward: a function returning its extracted answer trained on it
    ([1.0, 0.0, "42", 0.0], r"returned '42' \(str\) for prompt d.jsonl:2; expected a number or None"),
])
def test_bad_return_values_stop_with_the_function_and_row(returned, message):
    with pytest.raises(UserError, match=message):
        run(lambda prompts, completions, **kw: returned)


def test_a_column_named_like_an_argument_is_refused():
    with pytest.raises(UserError, match=r"d.jsonl:2: field 'completions'"):
        run(lambda prompts, completions, **kw: [0.0] * 4,
            columns=[{}, {}, {"completions": 1}, {"completions": 1}])


# ----------------------------------------------------------------------------- data columns

def test_prompt_rows_keep_their_other_fields(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "How many?", "answer": "3", "meta": {"level": 1}}) + "\n")
    s = load_samples([str(f)], "prompts")[0]
    assert s.columns == {"answer": "3", "meta": {"level": 1}}
    assert load_samples([os.path.join(DATA, "sft.jsonl")], "sft")[0].columns is None  # prompt loads only
    shipped = load_samples([os.path.join(DATA, "count_heldout.jsonl")], "prompts")
    assert all(s.columns["answer"].isdigit() for s in shipped)


def test_step3_prompt_items_carry_text_columns_and_row(tokenizer_of, tmp_path):
    from step3_ppo.main import encode_prompts, prompt_items
    from utils.encoding import Encoder

    f, g = tmp_path / "p.jsonl", tmp_path / "m.jsonl"
    f.write_text(json.dumps({"prompt": "Count: 1 2.", "answer": "2"}) + "\n")
    g.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi."}], "answer": 1}) + "\n")
    enc = Encoder(tokenizer_of("llama"), "hh", 64)
    samples = load_samples([str(f), str(g)], "prompts")
    items = prompt_items(samples, enc, 64, "prompts")
    assert [it.ids for it in items] == encode_prompts(samples, enc, 64, "prompts")
    assert [(it.text, it.columns, it.where) for it in items] == [("Count: 1 2.", {"answer": "2"}, f"{f}:1"),
                                                                ("Hi.", {"answer": 1}, f"{g}:1")]


def test_number_answers_and_every_row_are_checked_up_front():
    """A float `answer` column compared as its decimal text: str(1e-05) is "1e-05", whose last number
    is 05, so "0.00001" scored 0 and "-5" scored 1. And step 3 tries every prompt row, not only the first:
    a row without an answer stopped the run mid-rollout."""
    from step3_ppo.main import check_reward_funcs
    from step3_ppo.rollout import PromptItem

    assert exact_match(["q"] * 3, ["The answer is 0.00001.", "The answer is -5.", "It is 16."],
                       [1e-05, 1e-05, 1e16]) == [1.0, 0.0, 0.0]
    f = RewardFunc("utils.reward_funcs:exact_match", "exact_match", exact_match, 1.0)
    items = [PromptItem([1], f"Q{i}", {"answer": "7"}, f"p.jsonl:{i + 1}") for i in range(700)]
    items[650] = PromptItem([1], "Q", {"answer": "seven"}, "p.jsonl:651")
    with pytest.raises(UserError, match=r"exact_match raised ValueError: answer 'seven' has no number \(prompt "
                                        r"p.jsonl:651"):
        check_reward_funcs([f], items, 16)


def test_conversational_prompt_rows_get_trls_conversational_form(tokenizer_of, tmp_path):
    """TRL hands a reward function conversational prompts and completions for a conversational dataset:
    `prompts[i]` the turns, `completions[i]` [{"role": "assistant", "content": ...}]. A function written
    for that (completion[0]["content"]) failed here on strings. Plain rows keep strings; the shipped
    functions read both forms."""
    import torch

    from step3_ppo.main import prompt_items
    from step3_ppo.rollout import rule_scores
    from utils.encoding import Encoder
    from utils.reward_funcs import as_trl_inputs, text_of

    conv, plain = tmp_path / "c.jsonl", tmp_path / "p.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Count: 1 2."}], "answer": "2"}) + "\n")
    plain.write_text(json.dumps({"prompt": "Count: 1 2.", "answer": "2"}) + "\n")
    enc = Encoder(tokenizer_of("llama"), "hh", 64)
    seen = []

    def trl_style(prompts, completions, answer, **kwargs):
        seen.append((prompts, completions))
        return [float(c[0]["content"].endswith(a)) if isinstance(c, list) else float(c.endswith(a))
                for c, a in zip(completions, answer)]

    f = RewardFunc("mine.py:trl_style", "trl_style", trl_style, 1.0)
    tok = tokenizer_of("llama")
    for path in (conv, plain):
        (item,) = prompt_items(load_samples([str(path)], "prompts"), enc, 64, "prompts")
        answer = tok("The answer is 2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        b = {"answers": torch.tensor([answer]), "action_mask": torch.ones(1, len(answer)),
             "has_eos": torch.tensor([True])}
        total, _ = rule_scores([f], tok, b, [item], 16)
        assert total.tolist() == [1.0]
    (conv_prompts, conv_completions), (plain_prompts, plain_completions) = seen
    assert conv_prompts == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: 1 2."}]]
    assert conv_completions == [[{"role": "assistant", "content": "The answer is 2"}]]
    assert plain_prompts == ["Count: 1 2."] and plain_completions == ["The answer is 2"]
    # the shipped functions read either form
    prompts, completions = as_trl_inputs(["Q"], [({"role": "user", "content": "Q"},)], ["The answer is 7."])
    assert exact_match(prompts, completions, ["7"]) == answer_format(prompts, completions) == [1.0]
    assert text_of(prompts[0]) == "Q" and text_of("x") == "x"


def test_exact_match_reads_fractions_boxes_and_math_solutions():
    """Fractions were read as their last number, so "The answer is 4." scored 1 against 3/4 (a wrong
    answer rewarded), "(1,2)" was 12 and "−3" (Unicode minus) matched 3; MATH rows, whose answer is the
    `solution` column's \\boxed{}, stopped the run (exact_match took only `answer`)."""
    answers = ["3/4", "\\frac{3}{4}", "3/4", "\\boxed{\\frac{1}{2}}", "-3/4", "12", "3", "-3", "#### 1,234", "42"]
    completions = ["The answer is 4.", "\\boxed{4}", "$\\boxed{\\dfrac{3}{4}}$", "The answer is 0.5.",
                   "-\\frac{3}{4}", "(1,2)", "The answer is \u22123.", "The answer is \u22123.", "1,234",
                   "\\boxed{42}. Check: 6 x 7 = 42, step 3"]
    assert call(exact_match, completions, answer=answers) == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert final_number("(1,2)") == 2 and final_number("1,234.5") == 1234.5 and final_number("\\boxed{x}") is None
    solutions = ["So $x = \\boxed{5}$. Note 3 is not it.", "\\boxed{6}", "\\boxed{5}"]
    assert call(exact_match, ["5", "5", "5"], answer=["5", None, None], solution=[None] + solutions[1:]) == \
        [1.0, 0.0, 1.0]
    assert call(exact_match, ["5", "5"], solution=solutions[:1] * 2) == [1.0, 1.0]
    with pytest.raises(ValueError, match="'answer' column \\(or 'solution'\\), and the row has neither"):
        call(exact_match, ["5"], level=["1"])


def test_compare_reports_no_mean_for_a_function_that_applied_to_no_answer(capsys):
    """launch/compare.py, as step 3's metrics: a function that returned None for every answer has no mean
    (it printed 0.000, read as every answer scoring 0); one that applied to some answers averages those."""
    from types import SimpleNamespace

    from launch.compare import print_table, rule_means
    from utils.reward_funcs import RewardFunc

    funcs = [RewardFunc("f.py:never", "never", lambda prompts, completions, **kw: [None] * len(completions), 1.0),
             RewardFunc("f.py:some", "some", lambda prompts, completions, **kw: [1.0, None, 0.0], 2.0)]
    samples = [SimpleNamespace(prompt=({"role": "user", "content": "q"},), columns=None, where=f"f.jsonl:{i}")
               for i in range(3)]
    answers = [SimpleNamespace(text=t, ids=[1]) for t in ("a", "b", "c")]
    means = rule_means(funcs, samples, answers, 8)
    assert means == {"reward/never": None, "reward/some": 0.5}
    print_table({"sft": {"reward": None, "preferred_rate": None, "eos_rate": 1.0, "well_formed_rate": None,
                         "mean_length_tokens": 3.0, **means}})
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row == ["sft", "1.000", "3.000", "-", "0.500"]
