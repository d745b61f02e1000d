"""The fast per-sample gradient norms equal the reference's one-sample-at-a-time autograd loop (the oracle),
to 1e-4 relative, on a tiny Qwen2 with tied and with untied embeddings."""

import pytest
import torch

from dibs.core.batching import pad_right
from dibs.core.grad_norms import all_grad_norms, grad_norms, head_grad_norms, reference_grad_norms


def batch(vocab: int, pad_id: int, seed: int = 0):
    """Right-padded prompt+response rows of different lengths, and the response mask."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for prompt_len, response_len in [(5, 7), (3, 12), (8, 2), (4, 9), (6, 1)]:
        ids = torch.randint(0, vocab, (prompt_len + response_len,), generator=g)
        ids[prompt_len] = ids[0]  # a token id used in both prompt and response: rows summed per id
        ids[1] = pad_id  # the embedding's padding row gets no gradient through the lookup
        rows.append(ids)
        masks.append(torch.cat([torch.zeros(prompt_len), torch.ones(response_len)]))
    ids, attention = pad_right(rows, 0)
    response, _ = pad_right(masks, 0)
    return ids, attention, response


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("param", ["embed_tokens", "lm_head"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fast_paths_equal_the_per_sample_autograd_loop(tokenizer, tiny_model_factory, tied, param, reduction):
    model = tiny_model_factory(tied).float()
    ids, attention, response = batch(len(tokenizer), tokenizer.pad_token_id)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert (embed.data_ptr() == head.data_ptr()) == tied

    def hidden_fn(embeds, mask):
        return model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    def logits_fn(x, mask):
        return model(input_ids=x, attention_mask=mask).logits

    # the reference differentiates w.r.t. the named tensor; on a tied model both names are the one tensor,
    # and the kit's lm_head is its output-projection use: the lm_head of an untied copy with the same weights
    target = embed if param == "embed_tokens" else head
    if tied and param == "lm_head":
        target = head.detach().clone().requires_grad_(True)

        def logits_fn(x, mask):  # noqa: F811 - the untied copy's logits
            return model.model(input_ids=x, attention_mask=mask).last_hidden_state @ target.T

    oracle = reference_grad_norms(logits_fn, target, ids, attention, response, reduction=reduction)
    pad = model.model.embed_tokens.padding_idx
    assert pad == tokenizer.pad_token_id
    fast = grad_norms(
        hidden_fn, embed, head, ids, attention, response, param=param, reduction=reduction, padding_idx=pad
    )
    assert torch.all(oracle > 0)
    torch.testing.assert_close(fast, oracle, rtol=1e-4, atol=0)


def test_tied_norm_differs_from_either_part_alone(tokenizer, tiny_model_factory):
    # on a tied model the measured G counts the input-table and the output-projection gradients together
    tied = tiny_model_factory(True).float()
    ids, attention, response = batch(len(tokenizer), tokenizer.pad_token_id, seed=1)
    embed = tied.model.embed_tokens.weight

    def hidden_fn(embeds, mask):
        return tied.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    both = grad_norms(hidden_fn, embed, embed, ids, attention, response, param="embed_tokens")
    head_only = grad_norms(hidden_fn, embed, embed, ids, attention, response, param="lm_head")
    untied_head = grad_norms(hidden_fn, embed, embed.detach().clone(), ids, attention, response, param="lm_head")
    assert not torch.allclose(both, head_only, rtol=1e-3)
    torch.testing.assert_close(head_only, untied_head, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_closed_form_from_a_finished_forward_equals_the_fast_path(tokenizer, tiny_model_factory, reduction):
    # head_grad_norms reuses hidden states and logits of a pass that already ran (the generator's log-probs)
    model = tiny_model_factory(False).float()
    ids, attention, response = batch(len(tokenizer), tokenizer.pad_token_id, seed=2)
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    reused = head_grad_norms(out.hidden_states[-1], out.logits, ids, response, reduction=reduction)

    def hidden_fn(embeds, mask):
        return model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    fast = grad_norms(hidden_fn, embed, head, ids, attention, response, param="lm_head", reduction=reduction)
    torch.testing.assert_close(reused, fast, rtol=1e-5, atol=0)


def test_bad_arguments_are_named():
    ids = torch.zeros(1, 3, dtype=torch.long)
    w = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="param='all'"):
        grad_norms(lambda e, m: e, w, w, ids, torch.ones(1, 3), torch.ones(1, 3), param="all")
    with pytest.raises(ValueError, match="reduction='max'"):
        grad_norms(lambda e, m: e, w, w, ids, torch.ones(1, 3), torch.ones(1, 3), reduction="max")


def model_all_norms(model, ids, attention, response, **kwargs):
    """all_grad_norms on a Hugging Face causal LM: its own forward, input table and output projection."""
    return all_grad_norms(
        lambda e, m: model(inputs_embeds=e, attention_mask=m).logits,
        model,
        model.model.embed_tokens.weight,
        model.lm_head,
        ids,
        attention,
        response,
        **kwargs,
    )


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_parameter_norms_equal_the_per_sample_autograd_loop(tokenizer, tiny_model_factory, tied, reduction):
    # every trainable tensor: q/k/v (with biases), o, MLP, RMSNorm scales, the tables (tied: once)
    model = tiny_model_factory(tied).float()
    ids, attention, response = batch(len(tokenizer), tokenizer.pad_token_id, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(list(model.named_parameters()))  # the shared tensor listed once when tied

    def logits_fn(x, mask):
        return model(input_ids=x, attention_mask=mask).logits

    oracle = reference_grad_norms(logits_fn, params, ids, attention, response, reduction=reduction)
    fast = model_all_norms(
        model,
        ids,
        attention,
        response,
        tied=tied,
        reduction=reduction,
        padding_idx=model.model.embed_tokens.padding_idx,
    )
    torch.testing.assert_close(fast, oracle, rtol=1e-4, atol=0)


def test_all_parameter_norms_refuse_modules_they_cannot_handle(tokenizer, tiny_model_factory):
    model = tiny_model_factory(False).float()
    model.model.layers[0].extra = torch.nn.Conv1d(1, 1, 1)  # has parameters; never called
    ids, attention, response = batch(len(tokenizer), tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"layers\.0\.extra.*Conv1d"):
        model_all_norms(model, ids, attention, response, tied=False)


def test_all_parameter_norms_with_per_head_norms_and_a_response_free_row():
    # Qwen3 normalises queries and keys per head: RMSNorm scales applied to [B, L, heads, head_dim] inputs
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():  # scales away from 1, so a wrong per-head sum would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ids, attention, response = batch(48, 0, seed=4)
    response[2] = 0  # a row without response tokens: no loss, gradient norm 0
    params = list(model.parameters())
    oracle = reference_grad_norms(
        lambda x, m: model(input_ids=x, attention_mask=m).logits, params, ids, attention, response
    )
    fast = model_all_norms(model, ids, attention, response, tied=False)
    assert fast[2] == 0 and oracle[2] == 0
    torch.testing.assert_close(fast, oracle, rtol=1e-4, atol=1e-6)
