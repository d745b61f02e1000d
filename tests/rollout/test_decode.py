"""The HF backend's decode loop: its sampling distribution and its log-probs.

The model is the tests' tiny Qwen2 with its logits sharpened and EOS made likely (a hook on the output
projection, so every path sees the same model): distributions are far from uniform and rows finish at
different steps, so the loop drops rows mid-batch.
"""

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dibs.data.prompts import PromptTemplate, encode_prompts
from dibs.rollout.base import SamplingParams
from dibs.rollout.decode import filter_logits
from dibs.rollout.hf import HFGenerator


@pytest.fixture()
def model(tiny_model, tokenizer):
    bias = torch.zeros(tiny_model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 4.0
    tiny_model.lm_head.register_forward_hook(lambda module, args, out: 12.0 * out + bias)
    return tiny_model.eval()


@pytest.fixture()
def prompts(task, tokenizer):
    _, ids, _ = encode_prompts(task.test[:6], tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=256)
    assert len({len(p) for p in ids}) > 1  # left padding is exercised
    return ids


def teacher_forced(model, prompt, response, temperature):
    seq = torch.tensor([list(prompt) + response.tolist()])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, :-1].float() / temperature  # [L-1, V]
    return logits.log_softmax(-1).gather(-1, seq[0, 1:, None])[len(prompt) - 1 :, 0]


def exact_next_token(model, ids, sampling):
    """The next-token distribution generate() samples from, by transformers' own warpers."""
    with torch.no_grad():
        scores = model(input_ids=torch.tensor([ids])).logits[:, -1].float()
    scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return scores.softmax(-1)[0]


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, alpha_z: float = 3.29) -> tuple[bool, float, float]:
    """Pearson's test of counts against probs (categories with expectation < 5 pooled); the bound is the
    (1 - 5e-4) quantile of chi2(df) by the Wilson-Hilferty approximation."""
    n = counts.sum()
    expected = probs * n
    assert counts[probs == 0].sum() == 0, "a token outside the filtered support was drawn"
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    exp = torch.cat([expected[big].double(), expected[~big].sum(0, keepdim=True).double()])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    if df == 0:  # one token carries all the mass: drawing only it (checked above) is the whole test
        return True, stat, 0.0
    bound = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat < bound, stat, bound


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.7), (7, 0.85), (400, 0.999)])
def test_filter_logits_keeps_what_transformers_keeps(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k)
    scores = torch.randn(16, 400, generator=gen) * 3
    scores[0, :10] = 2.0  # ties at the cut
    expected = scores
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    torch.testing.assert_close(filter_logits(scores, top_k, top_p), expected)


def test_loop_logprobs_equal_a_teacher_forced_pass(model, tokenizer, prompts):
    gen = HFGenerator(model, tokenizer, token_budget=10_000, show_progress=False, decoder="loop")
    torch.manual_seed(0)
    out = gen.generate(prompts, [5] * len(prompts), SamplingParams(temperature=1.3, max_new_tokens=16))
    done = [c for g in out for c in g]
    lengths = {len(c.token_ids) for c in done}
    assert {c.finish_reason for c in done} == {"stop", "length"} and len(lengths) > 3  # rows left mid-batch
    worst = 0.0
    for prompt, group in zip(prompts, out):
        for c in group:
            assert (c.token_ids == tokenizer.eos_token_id).sum() == (c.finish_reason == "stop")
            expected = teacher_forced(gen.model, prompt, c.token_ids, 1.3)
            worst = max(worst, float((c.logprobs - expected).abs().max()))
    assert worst < 2e-5, f"decode-loop log-probs are {worst:.2e} from the teacher-forced pass"


@pytest.mark.parametrize("decoder", ["loop", "generate"])
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 50, 0.95)])
def test_both_decoders_sample_the_exact_distribution(model, tokenizer, prompts, decoder, temperature, top_k, top_p):
    """First tokens against the exact next-token distribution; second tokens, after each prompt's most common
    first token, against the exact distribution given it (the KV cache's step under left padding)."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=2)
    gen = HFGenerator(model, tokenizer, token_budget=100_000, show_progress=False, decoder=decoder)
    chosen = prompts[:3]
    torch.manual_seed(1)
    out = gen.generate(chosen, [1500] * len(chosen), sampling)
    vocab, eos = model.config.vocab_size, tokenizer.eos_token_id
    for prompt, group in zip(chosen, out):
        first = torch.tensor([int(c.token_ids[0]) for c in group])
        ok, stat, bound = chi_square_ok(
            torch.bincount(first, minlength=vocab), exact_next_token(model, prompt, sampling)
        )
        assert ok, f"{decoder}: first tokens chi2={stat:.1f} > {bound:.1f}"
        counts = torch.bincount(first[first != eos], minlength=vocab)
        y1 = int(counts.argmax())
        second = torch.tensor([int(c.token_ids[1]) for c in group if int(c.token_ids[0]) == y1])
        assert len(second) > 100
        probs = exact_next_token(model, list(prompt) + [y1], sampling)
        ok, stat, bound = chi_square_ok(torch.bincount(second, minlength=vocab), probs)
        assert ok, f"{decoder}: second tokens chi2={stat:.1f} > {bound:.1f}"


def test_a_wrong_distribution_fails_the_test(model, tokenizer, prompts):
    """The test above has power: samples at T = 1 fail against the T = 0.8 distribution."""
    gen = HFGenerator(model, tokenizer, token_budget=100_000, show_progress=False)
    torch.manual_seed(1)
    group = gen.generate(prompts[:1], [1500], SamplingParams(max_new_tokens=1))[0]
    first = torch.bincount(torch.tensor([int(c.token_ids[0]) for c in group]), minlength=model.config.vocab_size)
    assert chi_square_ok(first, exact_next_token(model, prompts[0], SamplingParams()))[0]
    assert not chi_square_ok(first, exact_next_token(model, prompts[0], SamplingParams(temperature=0.8)))[0]


def test_unknown_decoder_is_refused(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="rollout.generator.decoder='beam'"):
        HFGenerator(tiny_model, tokenizer, token_budget=100, show_progress=False, decoder="beam")
