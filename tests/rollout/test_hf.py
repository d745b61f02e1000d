import pytest
import torch

from dibs.core.grad_norms import reference_grad_norms
from dibs.data.prompts import PromptTemplate, encode_prompts
from dibs.rollout.base import SamplingParams
from dibs.rollout.hf import HFGenerator


@pytest.fixture()
def prompts(task, tokenizer):
    _, ids, _ = encode_prompts(task.test[:4], tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=256)
    return ids


def unbatched_logprobs(model, prompt, response, temperature):
    seq = torch.tensor([list(prompt) + response.tolist()])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, :-1].float() / temperature  # [L-1, V]
    logp = logits.log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1 :]


def test_variable_samples_per_prompt_and_consistent_outputs(tiny_model, tokenizer, prompts):
    gen = HFGenerator(tiny_model, tokenizer, token_budget=10_000, show_progress=False)
    torch.manual_seed(0)
    sampling = SamplingParams(temperature=1.3, max_new_tokens=12)
    out = gen.generate(prompts, [2, 0, 3, 1], sampling)
    assert [len(g) for g in out] == [2, 0, 3, 1]
    eos = tokenizer.eos_token_id
    for prompt, group in zip(prompts, out):
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) <= 12
            assert (c.finish_reason == "stop") == (c.token_ids[-1].item() == eos)
            assert (c.token_ids == eos).sum() <= 1  # nothing after the first EOS
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            # left-padded batched sampling and its log-probs agree with an unpadded single-sequence pass
            expected = unbatched_logprobs(gen.model, prompt, c.token_ids, 1.3)
            torch.testing.assert_close(c.logprobs, expected, atol=1e-4, rtol=1e-4)


def test_token_budget_chunks_give_same_logprob_semantics(tiny_model, tokenizer, prompts):
    gen = HFGenerator(tiny_model, tokenizer, token_budget=1, show_progress=False)  # one row per generate() call
    out = gen.generate(prompts[:2], [2, 2], SamplingParams(max_new_tokens=6))
    for prompt, group in zip(prompts[:2], out):
        for c in group:
            torch.testing.assert_close(
                c.logprobs, unbatched_logprobs(gen.model, prompt, c.token_ids, 1.0), atol=1e-4, rtol=1e-4
            )


def test_sampling_is_reproducible_under_a_seed(tiny_model, tokenizer, prompts):
    gen = HFGenerator(tiny_model, tokenizer, token_budget=32768, show_progress=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([c.token_ids.tolist() for g in gen.generate(prompts, [2] * 4, SamplingParams()) for c in g])
    assert runs[0] == runs[1]


def test_load_weights_updates_the_generator_copy_including_tied_names(tiny_model, tokenizer, prompts):
    gen = HFGenerator(tiny_model, tokenizer, token_budget=32768, show_progress=False)
    assert gen.model is not tiny_model  # the generator owns its copy
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.5)
    state = tiny_model.state_dict()
    assert "lm_head.weight" in state  # tied: present under both names
    gen.load_weights(state.items())
    for name, tensor in gen.model.state_dict().items():
        torch.testing.assert_close(tensor, state[name])
    with pytest.raises(KeyError, match="no parameter named 'nope'"):
        gen.load_weights([("nope", torch.zeros(1))])


def test_generation_config_of_a_checkpoint_does_not_leak(tiny_model, tokenizer, prompts):
    tiny_model.generation_config.repetition_penalty = 5.0  # as a hub generation_config.json might set
    tiny_model.generation_config.top_k = 3
    gen = HFGenerator(tiny_model, tokenizer, token_budget=32768, show_progress=False)
    assert gen.model.generation_config.repetition_penalty in (None, 1.0)
    assert gen.model.generation_config.top_k in (None, 0, 50)  # overridden per call by SamplingParams.top_k


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


@pytest.mark.parametrize("tied", [True, False])
def test_head_grad_norms_from_the_logprob_pass_equal_the_autograd_oracle(tokenizer, tiny_model_factory, prompts, tied):
    # G w.r.t. lm_head comes with the teacher-forced log-prob pass (a hook catches the projection's input);
    # it must equal the per-sample autograd loop on an untied copy of the same weights
    model = tiny_model_factory(tied).float()
    gen = HFGenerator(model, tokenizer, token_budget=10_000, show_progress=False)
    torch.manual_seed(1)
    out = gen.generate(prompts, [2, 1, 0, 2], SamplingParams(temperature=1.2, max_new_tokens=10), head_grad_norms=True)
    plain = gen.generate(prompts[:1], [1], SamplingParams(max_new_tokens=4))
    assert plain[0][0].head_grad_norm is None  # only measured when asked for
    head = gen.model.lm_head.weight.detach().clone().requires_grad_(True)

    def logits_fn(x, mask):
        return gen.model.model(input_ids=x, attention_mask=mask).last_hidden_state @ head.T

    for prompt, group in zip(prompts, out):
        for c in group:
            ids = torch.tensor([list(prompt) + c.token_ids.tolist()])
            response = torch.zeros_like(ids, dtype=torch.float32)
            response[0, len(prompt) :] = 1
            oracle = reference_grad_norms(logits_fn, head, ids, torch.ones_like(ids), response)
            assert c.head_grad_norm > 0
            torch.testing.assert_close(torch.tensor([c.head_grad_norm]), oracle, rtol=1e-4, atol=0)
