"""The pool's encoded prompts, cached: the same problems, ids and drops as encoding them afresh."""

import dataclasses

import pytest

import dibs.data.prompts as prompts
from dibs.data.prompts import PromptTemplate, encode_prompts, encode_prompts_cached


def test_cached_prompts_equal_fresh_ones_and_are_read_back(task, tokenizer, tmp_path, monkeypatch):
    problems = task.train[:50]
    template = PromptTemplate("Be brief.", " Answer:", "")
    limit = sorted(len(i) for i in encode_prompts(problems, tokenizer, template, max_prompt_tokens=10**6)[1])[40]
    fresh = encode_prompts(problems, tokenizer, template, max_prompt_tokens=limit)
    assert fresh[2], "some prompts are over the limit, so drops are exercised"
    first = encode_prompts_cached(problems, tokenizer, template, max_prompt_tokens=limit, cache_dir=tmp_path)
    assert first == fresh and len(list((tmp_path / "prompts").glob("*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again instead of read back")

    monkeypatch.setattr(prompts, "encode_prompts", refuse)
    assert encode_prompts_cached(problems, tokenizer, template, max_prompt_tokens=limit, cache_dir=tmp_path) == fresh
    # anything the ids depend on is in the key: another text, template or limit encodes afresh
    changed = [dataclasses.replace(problems[0], problem=problems[0].problem + " ")] + problems[1:]
    for args in (
        (changed, template, limit),
        (problems, PromptTemplate(None, " Answer:", ""), limit),
        (problems, template, limit + 1),
    ):
        with pytest.raises(AssertionError, match="encoded again"):
            encode_prompts_cached(args[0], tokenizer, args[1], max_prompt_tokens=args[2], cache_dir=tmp_path)


def test_a_damaged_cache_file_is_encoded_again(task, tokenizer, tmp_path):
    problems, template = task.train[:10], PromptTemplate(None, "", "")
    fresh = encode_prompts(problems, tokenizer, template, max_prompt_tokens=256)
    encode_prompts_cached(problems, tokenizer, template, max_prompt_tokens=256, cache_dir=tmp_path)
    (path,) = (tmp_path / "prompts").glob("*.npz")
    path.write_bytes(b"not a zip")
    assert encode_prompts_cached(problems, tokenizer, template, max_prompt_tokens=256, cache_dir=tmp_path) == fresh
