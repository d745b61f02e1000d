"""Prompt templates (conf/template) and the evaluation sets (conf/benchmarks): the five benchmark files of
docs/method.md load with their quirks handled, and every misconfiguration names the setting to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dibs.data.benchmarks import load_benchmarks, sorted_levels
from dibs.data.prompts import PromptTemplate
from dibs.data.records import Problem

CONF = Path(__file__).resolve().parents[2] / "conf"
BENCHMARKS = CONF.parents[1] / "shared" / "data" / "benchmarks"  # beside the checkout in CI; never copied in
SETS = yaml.safe_load((CONF / "benchmarks" / "default.yaml").read_text())
TEMPLATES = {f.stem: PromptTemplate(**yaml.safe_load(f.read_text())) for f in (CONF / "template").glob("*.yaml")}
needs_files = pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="benchmark files not found beside the checkout")


def load(names, tokenizer, **kw):
    args = dict(sets=SETS["sets"], tokenizer=tokenizer, template=TEMPLATES["none"], max_prompt_tokens=4096)
    return load_benchmarks(names, **{**args, **kw})


# ---- templates ---------------------------------------------------------------------------------------------
def test_the_named_templates_exist():
    assert set(TEMPLATES) == {"none", "paper", "qwen25-math-cot", "qwen-boxed", "think", "answer_tags"}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_renders_through_the_chat_template(name, tokenizer):
    template = TEMPLATES[name]
    text = template.render(tokenizer, "What is 2 + 3?")
    user = "<|im_start|>user\nWhat is 2 + 3?" + template.user_suffix + "<|im_end|>\n"
    system = f"<|im_start|>system\n{template.system_prompt}<|im_end|>\n" if template.system_prompt else ""
    assert text == system + user + "<|im_start|>assistant\n" + template.response_prefix


def test_the_papers_template_is_section_6s():
    paper = TEMPLATES["paper"]
    assert paper.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    assert paper.user_suffix == " Let's think step by step and output the final answer within \\boxed{}"
    assert TEMPLATES["think"].response_prefix == "<think>\n"  # the assistant turn opens the thought


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(tokenizer):
    bare = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        TEMPLATES["paper"].render(bare, "1 + 1?")


# ---- the five benchmarks -----------------------------------------------------------------------------------
@needs_files
def test_the_five_benchmarks_load_with_their_quirks(tokenizer):
    names = ["math500", "minerva_math", "olympiad_bench", "aime24", "amc23"]
    loaded = {b.name: b for b in load(names, tokenizer, dir=str(BENCHMARKS))}
    assert {n: len(b.problems) for n, b in loaded.items()} == {
        "math500": 500, "minerva_math": 272, "olympiad_bench": 675, "aime24": 30, "amc23": 40
    }  # fmt: skip
    assert all(not b.dropped and not b.skipped for b in loaded.values())
    assert loaded["math500"].levels == ["1", "2", "3", "4", "5"]  # integers in the file, numeric order
    assert all(b.levels == [""] for n, b in loaded.items() if n != "math500")
    # Minerva's `answer` is a worked solution: the gold is its last \boxed{} value, not the text
    minerva = json.loads((BENCHMARKS / "minerva_math.jsonl").read_text().splitlines()[0])
    assert "\\boxed" in minerva["answer"] and "\\boxed" not in loaded["minerva_math"].problems[0].answer
    assert loaded["minerva_math"].problems[0].answer in minerva["answer"]
    assert loaded["amc23"].problems[0].answer == "27"  # 27.0 in the file
    olympiad = [json.loads(line)["answer"] for line in (BENCHMARKS / "olympiad_bench.jsonl").read_text().splitlines()]
    assert [p.answer for p in loaded["olympiad_bench"].problems] == [", ".join(a) for a in olympiad]  # lists


@needs_files
def test_overlong_benchmark_prompts_are_dropped_and_reported(tokenizer):
    (math500,) = load(["math500"], tokenizer, dir=str(BENCHMARKS), max_prompt_tokens=120)
    assert math500.dropped and len(math500.problems) + len(math500.dropped) == 500
    assert all("max_prompt_tokens=120" in m for m in math500.dropped)


def test_the_embedded_benchmark_is_the_data_sources_held_out_split(task, tokenizer):
    (embedded,) = load(["embedded"], tokenizer, held_out=task.test)
    assert [p.uid for p in embedded.problems] == [p.uid for p in task.test]
    assert embedded.levels == sorted_levels([p.level for p in task.test])


def test_a_benchmark_row_without_an_answer_names_file_row_and_field(tmp_path, tokenizer):
    rows = [{"problem": "1 + 1?", "answer": "2"}, {"problem": "2 + 2?"}]
    (tmp_path / "aime24.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"aime24.jsonl row 2: field 'answer' is missing"):
        load(["aime24"], tokenizer, dir=str(tmp_path))
    (aime,) = load(["aime24"], tokenizer, dir=str(tmp_path), on_bad_row="skip")
    assert len(aime.problems) == 1 and len(aime.skipped) == 1


@pytest.mark.parametrize(
    ("names", "kw", "message"),
    [
        (["gsm8k"], {}, r"unknown benchmark\(s\) \['gsm8k'\]"),
        ([], {}, "eval.benchmarks is empty"),
        (["math500", "math500"], {"dir": "."}, "names a benchmark twice"),
        (["math500"], {}, "benchmarks.dir, which is not set"),
        (["embedded"], {}, "the data source has none"),
        (["math500"], {"dir": "/nonexistent"}, "benchmarks.sets.math500.path"),
    ],
)
def test_misconfigured_benchmarks_name_the_setting(names, kw, message, tokenizer):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load(names, tokenizer, **kw)


def test_an_unknown_key_in_a_benchmark_set_is_refused(tokenizer):
    sets = {"mine": {"path": "x.jsonl", "answer_field": "answer"}}
    with pytest.raises(ValueError, match=r"benchmarks.sets.mine: unknown key\(s\) \['answer_field'\]"):
        load(["mine"], tokenizer, sets=sets, dir=".")


def test_levels_sort_numerically_when_they_are_numbers():
    assert sorted_levels(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert sorted_levels(["Level 2", "Level 10"]) == ["Level 10", "Level 2"]  # text: string order
    assert sorted_levels([Problem("a", "q", "1").level]) == [""]
