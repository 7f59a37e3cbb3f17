"""Rule-based rewards for step 3: loading `--reward_funcs`, calling them safely, and shipped functions.

The calling convention is TRL's, so existing reward functions can be reused unchanged:

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

`prompts[i]` is the text of the prompt's last turn (the "prompt" string of a {"prompt": ...} row),
`completions[i]` the decoded answer without its EOS. As in TRL, a conversational prompt row (a `prompt`
or `messages` list of turns) gives its function conversational values instead: `prompts[i]` the prompt's
turns (a list of {"role", "content"}) and `completions[i]` `[{"role": "assistant", "content": answer}]`
(`text_of` reads either form). `kwargs` holds the prompt row's other fields as
lists aligned with the completions (e.g. `answer=["3", "3", ...]`; None where a row lacks the field),
plus `completion_ids` (the generated token ids, EOS included when the answer ended) and
`max_completion_length` (--max_answer_seq_len). A function should accept **kwargs for what it does
not use. None means "does not apply to this answer": it adds nothing to the reward and is left out of
the function's mean. Raising, returning the wrong number of values, a non-finite value or text (a str, even "1.0") stops
the run with a message naming the function and the prompt row.

`--reward_funcs` entries are `FILE.py:NAME` (the file's directory is importable while it loads, as
for a script) or `package.module:NAME`, e.g. `utils.reward_funcs:exact_match`.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Callable

from .errors import UserError

RESERVED = ("prompts", "completions", "completion_ids", "max_completion_length")
# A number: thousands groups of exactly three digits ("1,234", while "1,2" is two numbers, as in "(1,2)"),
# an optional decimal part; a value is a number, a fraction "3/4" or a LaTeX \frac{3}{4} (\dfrac, \tfrac).
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_VALUE = re.compile(rf"([-+]?)(?:\\[dt]?frac\{{\s*([-+]?{_DIGITS})\s*\}}\{{\s*({_DIGITS})\s*\}}"
                    rf"|({_DIGITS})(?:\s*/\s*({_DIGITS}))?)")
_BOXED = "\\boxed{"


# ----------------------------------------------------------------------------- shipped functions

def text_of(value) -> str:
    """A prompt or completion as text in either of TRL's forms: a string as it is, a list of turns as its
    last turn's content (a conversational prompt's question, a completion's answer)."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]["content"]) if value else ""
    return value


def as_trl_inputs(texts: list[str], turns: list, completions: list[str]) -> tuple[list, list]:
    """(prompts, completions) as TRL hands them to a reward function: conversational where every prompt
    of the batch came as turns (`turns[i]` not None), else the prompts' last turns as text."""
    if completions and all(t is not None for t in turns):
        return [[dict(m) for m in t] for t in turns], [[{"role": "assistant", "content": c}] for c in completions]
    return list(texts), list(completions)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text` (nested braces matched; to the end if unclosed), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i = j = start + len(_BOXED)
    depth = 1
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else text[i:]


def _number(digits: str) -> Fraction:
    return Fraction(Decimal(digits.replace(",", "")))


def final_number(text) -> Fraction | None:
    """The value of the last number written in `text`, or None if there is none: "1,234" and "7.0" as
    numbers, "3/4" and \\frac{3}{4} as fractions (read as the last number, 4, they made "The answer is 4."
    match 3/4), a Unicode minus as "-"; where `text` has a \\boxed{...}, the last one's content is the
    answer (MATH's convention; a number written after it is not)."""
    text = str(text).replace("\u2212", "-")
    boxed = last_boxed(text)
    found = _VALUE.findall(text if boxed is None else boxed)
    if not found:
        return None
    sign, frac_top, frac_bottom, top, bottom = found[-1]
    top, bottom = (frac_top, frac_bottom) if frac_bottom else (top, bottom)
    value = _number(top) / _number(bottom) if bottom and _number(bottom) else _number(top)
    return -value if sign == "-" else value


def exact_match(prompts, completions, answer=None, solution=None, **kwargs) -> list[float]:
    """1.0 where the final number of the completion (`final_number`) equals that of the row's `answer`
    column, or of its `solution` (MATH's column) where the row has no `answer` ("The answer is 7." matches
    answer "7" or 7; 7.0 equals 7, 0.5 equals 1/2), else 0.0. A row without either column, or whose answer
    has no number, is a data error (raises ValueError)."""
    if answer is None and solution is None:
        raise ValueError("exact_match reads the row's 'answer' column (or 'solution'), and the row has neither")
    n = len(completions)
    answer, solution = answer or [None] * n, solution or [None] * n
    out = []
    for completion, given, worked in zip(completions, answer, solution, strict=True):
        truth = given if given is not None else worked
        # A number column is its own value: str(1e-05) is "1e-05", whose last number written is 05.
        want = Fraction(Decimal(str(truth))) if isinstance(truth, (int, float)) and not isinstance(truth, bool) \
            and math.isfinite(truth) else final_number(truth)
        if want is None:
            raise ValueError(f"answer {truth!r} has no number")
        got = final_number(text_of(completion))
        out.append(1.0 if got is not None and got == want else 0.0)
    return out


def regex_reward(pattern: str, name: str = "regex_reward") -> Callable:
    """A format reward: 1.0 where the whole completion (surrounding whitespace stripped) matches `pattern`,
    else 0.0. Use it in a reward file: `well_formed = regex_reward(r"The \\w+ is \\w+\\.", "well_formed")`."""
    compiled = re.compile(pattern, re.DOTALL)

    def fn(prompts, completions, **kwargs) -> list[float]:
        return [1.0 if compiled.fullmatch(text_of(c).strip()) else 0.0 for c in completions]

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"1.0 where the completion fully matches {pattern!r}, else 0.0."
    return fn


# Ends with a final-answer sentence, "... The answer is 42." (reasoning before it is allowed).
answer_format = regex_reward(r"(.*\s)?The answer is [-+]?\d[\d,]*(\.\d+)?\.", "answer_format")


def overlong_penalty_with(cache: int | None = None, name: str = "overlong_penalty") -> Callable:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) with length budget L = max_completion_length
    and a soft zone of `cache` tokens before it (default L // 4):

      0                        for |y| <= L - cache
      ((L - cache) - |y|) / cache   for L - cache < |y| <= L   (falls linearly to -1 at the budget)

    |y| counts the generated tokens (completion_ids, EOS included), so an answer cut at the budget gets -1."""

    def fn(prompts, completions, completion_ids, max_completion_length, **kwargs) -> list[float]:
        budget = int(max_completion_length)
        soft = cache if cache is not None else max(1, budget // 4)
        start = budget - soft
        return [0.0 if len(ids) <= start else (start - len(ids)) / soft for ids in completion_ids]

    fn.__name__ = fn.__qualname__ = name
    return fn


overlong_penalty = overlong_penalty_with()


# ----------------------------------------------------------------------------- loading

@dataclass
class RewardFunc:
    spec: str      # as given on the command line
    name: str      # metric name: reward/<name>
    fn: Callable
    weight: float


def _load_module(spec: str, target: str):
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise UserError(f"--reward_funcs {spec}: file '{target}' does not exist")
        name = "reward_funcs_" + re.sub(r"\W", "_", os.path.relpath(path))
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, os.path.dirname(path))  # its own helpers import as from a script
        try:
            mod_spec.loader.exec_module(module)
        except SystemExit as e:  # a script's sys.exit() or argparse at import: step 3 exited with its code
            raise UserError(f"--reward_funcs {spec}: loading '{target}' called sys.exit({e.code!r}) (its top level "
                            "runs as a script: put that under `if __name__ == \"__main__\":`)") from None
        except Exception as e:  # the user's file: any error is theirs to fix, reported in one line
            raise UserError(f"--reward_funcs {spec}: loading '{target}' raised {type(e).__name__}: {e}") from None
        finally:
            sys.path.remove(os.path.dirname(path))
        return module
    try:
        return importlib.import_module(target)
    except SystemExit as e:
        raise UserError(f"--reward_funcs {spec}: importing '{target}' called sys.exit({e.code!r}) (its top level "
                        "runs as a script: put that under `if __name__ == \"__main__\":`)") from None
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise UserError(f"--reward_funcs {spec}: cannot import module '{target}' ({type(e).__name__}: {e}); "
                        "give FILE.py:NAME or package.module:NAME") from None


def load_reward_funcs(specs: list[str], weights: list[float]) -> list[RewardFunc]:
    """The functions named by --reward_funcs with their --reward_weights (default 1.0 each)."""
    if weights and len(weights) != len(specs):
        raise UserError(f"--reward_weights has {len(weights)} values for {len(specs)} --reward_funcs; give one "
                        "weight per function (or none for 1.0 each)")
    out, names = [], set()
    for i, spec in enumerate(specs):
        target, sep, attr = spec.rpartition(":")
        if not sep or not target or not attr:
            raise UserError(f"--reward_funcs {spec}: expected FILE.py:NAME or package.module:NAME")
        fn = getattr(_load_module(spec, target), attr, None)
        if fn is None:
            raise UserError(f"--reward_funcs {spec}: '{target}' has no '{attr}'")
        if not callable(fn):
            raise UserError(f"--reward_funcs {spec}: '{attr}' is a {type(fn).__name__}, not a function")
        if attr in names:
            raise UserError(f"--reward_funcs: two functions are named '{attr}'; their metrics would collide")
        names.add(attr)
        try:
            w = float(weights[i]) if weights else 1.0
        except ValueError:
            w = math.nan
        if not math.isfinite(w):
            raise UserError(f"--reward_weights: {weights[i]!r} is not a finite number")
        out.append(RewardFunc(spec, attr, fn, w))
    return out


# ----------------------------------------------------------------------------- calling

def _columns(rows: list[dict | None], wheres: list[str]) -> dict:
    keys = list(dict.fromkeys(k for r in rows for k in (r or {})))
    for k in keys:
        if k in RESERVED:
            row = next(w for r, w in zip(rows, wheres) if r and k in r)
            raise UserError(f"{row}: field '{k}' has the name of a reward-function argument; rename the column")
    return {k: [(r or {}).get(k) for r in rows] for k in keys}


def _value(f: RewardFunc, v, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    try:
        # Text is refused even where float() reads it: a function returning the extracted answer ("42")
        # instead of a reward would otherwise train on 42 as the reward.
        if isinstance(v, (str, bytes)):
            raise TypeError
        x = float(v)
    except (TypeError, ValueError):
        raise UserError(f"reward function {f.spec} returned {v!r} ({type(v).__name__}) for prompt {where}; "
                        "expected a number or None") from None
    if not math.isfinite(x):
        raise UserError(f"reward function {f.spec} returned {x} for prompt {where}; rewards must be finite")
    return x


def _call(f: RewardFunc, prompts, completions, kwargs):
    return f.fn(prompts=prompts, completions=completions, **kwargs)


def call_reward_func(f: RewardFunc, prompts: list[str], completions: list[str], columns: list[dict | None],
                     completion_ids: list[list[int]], max_completion_length: int,
                     wheres: list[str]) -> list[float | None]:
    """One function on one batch, checked: a list of N finite floats (or None). `wheres` names each
    answer's prompt row ("file:line") for error messages."""
    n = len(completions)
    kwargs = dict(_columns(columns, wheres), completion_ids=completion_ids,
                  max_completion_length=max_completion_length)
    try:
        values = _call(f, prompts, completions, kwargs)
    except Exception as e:  # the user's function failed: find the row that makes it fail
        bad = 0
        for i in range(n):
            one = {k: v[i:i + 1] if isinstance(v, list) else v for k, v in kwargs.items()}
            try:
                _call(f, prompts[i:i + 1], completions[i:i + 1], one)
            except Exception:  # this row reproduces the failure on its own
                bad = i
                break
        raise UserError(f"reward function {f.spec} raised {type(e).__name__}: {e} (prompt {wheres[bad]}, answer "
                        f"{text_of(completions[bad])!r})") from None
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"reward function {f.spec} returned {type(values).__name__}, not a list of {n} rewards "
                        f"(batch starting at prompt {wheres[0]})") from None
    if len(values) != n:
        raise UserError(f"reward function {f.spec} returned {len(values)} rewards for {n} completions "
                        f"(batch starting at prompt {wheres[0]})")
    return [_value(f, v, w) for v, w in zip(values, wheres)]


def score_with_funcs(funcs: list[RewardFunc], prompts: list[str], completions: list[str],
                     columns: list[dict | None], completion_ids: list[list[int]], max_completion_length: int,
                     wheres: list[str]) -> tuple[list[float], dict[str, list[float | None]]]:
    """sum_f weight_f * f(answer) per answer (None counts 0), and each function's raw values."""
    total = [0.0] * len(completions)
    per_func = {}
    for f in funcs:
        values = call_reward_func(f, prompts, completions, columns, completion_ids, max_completion_length, wheres)
        per_func[f.name] = values
        total = [t + (f.weight * v if v is not None else 0.0) for t, v in zip(total, values)]
    return total, per_func
