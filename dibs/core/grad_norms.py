"""Per-sample gradient norms for GVM's G_i (docs/method.md), pure torch.

For each accepted sample, G = ‖∂L/∂θ‖₂ with L = −Σ_t log π(y_t | x, y_<t) summed over the response tokens
(``reduction="mean"`` divides by their number), θ one parameter tensor. The reference computes this with
one batch-1 forward and backward per sample (:func:`reference_grad_norms`, kept as the oracle). The fast
paths here need one batched forward (and, for the input embedding, one batched backward) for all samples:

- ``lm_head``: ∂L/∂W = Σ_t e_t h_tᵀ with e_t = softmax(z_t) − onehot(y_t) and h_t the final hidden state,
  so ‖∂L/∂W‖² = Σ_{t,s} ⟨e_t, e_s⟩⟨h_t, h_s⟩ (the Gram trick), or ‖Eᵀ H‖² directly when that is cheaper;
  no backward pass at all.
- ``embed_tokens`` (untied): the gradient reaches the table only through the rows the sequence looked up,
  ∂L/∂W_v = Σ_{t: x_t = v} g_t with g_t = ∂L/∂(input embedding t). Samples do not interact in a forward
  pass, so one backward of Σ_b L_b gives every sample's g_t at once; rows are then summed per token id.
- ``embed_tokens`` with tied embeddings (one tensor is both the input table and the output projection):
  the gradient of the shared tensor is the sum of both parts, and ‖A + B‖² = ‖A‖² + ‖B‖² + 2⟨A, B⟩ with
  ⟨A, B⟩ = Σ_{t,s} E[s, x_t] ⟨g_t, h_s⟩. This is what the reference measures on a tied model, where
  ``named_parameters()`` lists the shared tensor once, as ``embed_tokens``.
- ``lm_head`` with tied embeddings: the gradient of the shared tensor in its role as the output projection
  only (the term B above), i.e. what ``lm_head`` measures on the untied model with the same weights. It
  needs no backward on either kind of model.

:func:`head_grad_norms` is the ``lm_head`` closed form from a forward pass that already ran (hidden states
and logits at hand): the generation backend's teacher-forced log-prob pass uses it, so measuring G_i w.r.t.
``lm_head`` costs a Gram product per sample and no forward of its own.

``hidden_fn(inputs_embeds, attention_mask) -> [B, L, H]`` is the model body up to the final norm; the
output projection is ``hidden @ head_weight.T`` (no bias, as in Qwen2 and Llama). Temperature 1, as the
reference.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["PARAMS", "all_grad_norms", "grad_norms", "head_grad_norms", "reference_grad_norms"]

PARAMS = ("embed_tokens", "lm_head")
HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _targets(input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, L−1] (the next token) and their float mask; ``response_mask`` is [B, L], 1 on response tokens."""
    return input_ids[:, 1:], response_mask[:, 1:].to(torch.float32)


def _output_errors(hidden: torch.Tensor, head_weight: torch.Tensor, target: torch.Tensor, keep: torch.Tensor):
    """E = (softmax(H Wᵀ) − onehot(y)) and H, zeroed where ``keep`` is 0; [B, T, V] and [B, T, H], float32."""
    return _errors_from_logits(hidden, hidden.float() @ head_weight.float().T, target, keep)


def _errors_from_logits(hidden: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor):
    keep = keep.to(torch.float32).unsqueeze(-1)
    h = hidden.float() * keep
    e = torch.softmax(logits.float(), dim=-1)  # the one [B, T, V] float32 tensor made here; then in place
    e.scatter_add_(-1, target.unsqueeze(-1), -torch.ones_like(target, dtype=e.dtype).unsqueeze(-1)).mul_(keep)
    return e, h


def _compact(keep: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Only the kept (response) positions, moved to the front of each row: [B, T] → [B, T_kept_max].

    The output-projection closed form never needs a prompt position, so its softmax and Gram products
    run over the response tokens alone."""
    width = max(int(keep.sum(dim=1).max()), 1)
    idx = torch.argsort((keep <= 0).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first

    def pick(t: torch.Tensor) -> torch.Tensor:  # [B, T] or [B, T, D]
        return t.gather(1, idx) if t.dim() == 2 else t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    return [pick(keep), *(pick(t) for t in tensors)]


def _gram_sq(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row b: ‖E_bᵀ H_b‖_F² = Σ_{t,s} ⟨e_t, e_s⟩⟨h_t, h_s⟩, batched; [B]."""
    return ((e @ e.transpose(1, 2)) * (h @ h.transpose(1, 2))).sum(dim=(1, 2))


@torch.no_grad()
def _lm_head_norms(hidden, head_weight, input_ids, response_mask) -> torch.Tensor:
    target, keep = _targets(input_ids, response_mask)
    keep, target, hidden = _compact(keep, target, hidden[:, :-1])
    e, h = _output_errors(hidden, head_weight, target, keep)
    return _gram_sq(e, h).clamp(min=0).sqrt()


@torch.no_grad()
def head_grad_norms(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """[B] norms of the ``lm_head`` gradient from a forward that already ran, no parameter needed.

    ``hidden`` [B, L, H] is the output projection's input (the final normed hidden state), ``logits``
    [B, L, V] its output at temperature 1; rows are prompt + response, right-padded, ``response_mask`` as in
    :func:`grad_norms`.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is not 'sum' or 'mean'")
    target, keep = _targets(input_ids, response_mask)
    keep, target, hidden, logits = _compact(keep, target, hidden[:, :-1], logits[:, :-1])
    e, h = _errors_from_logits(hidden, logits, target, keep)
    norms = _gram_sq(e, h).clamp(min=0).sqrt()
    if reduction == "mean":
        norms = norms / keep.sum(dim=1).clamp(min=1)
    return norms


def grad_norms(
    hidden_fn: HiddenFn,
    embed_weight: torch.Tensor,
    head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    param: str = "embed_tokens",
    reduction: str = "sum",
    padding_idx: int | None = None,
) -> torch.Tensor:
    """[B] gradient norms, one per sample (row), w.r.t. ``param``; rows are prompt + response, right-padded.

    ``response_mask`` [B, L] marks response tokens (the ones whose log-probability is summed).
    ``padding_idx`` is the embedding's (``nn.Embedding(padding_idx=...)``): its row never receives a gradient
    through the lookup, so occurrences of that id are left out of the input-table part, as autograd does.
    """
    if param not in PARAMS:
        raise ValueError(f"param={param!r} is not one of {PARAMS}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is not 'sum' or 'mean'")
    tied = embed_weight.data_ptr() == head_weight.data_ptr()
    embeds = embed_weight.detach()[input_ids]  # [B, L, H]
    if param == "lm_head":  # tied or not: the output projection's part, in closed form
        with torch.no_grad():
            norms = _lm_head_norms(hidden_fn(embeds, attention_mask), head_weight, input_ids, response_mask)
    else:
        norms = _embedding_norms(
            hidden_fn, embeds, head_weight, input_ids, attention_mask, response_mask, tied, padding_idx
        )
    if reduction == "mean":
        norms = norms / response_mask[:, 1:].sum(dim=1).clamp(min=1).to(norms.dtype)
    return norms


def _embedding_norms(
    hidden_fn, embeds, head_weight, input_ids, attention_mask, response_mask, tied, padding_idx
) -> torch.Tensor:
    embeds = embeds.clone().requires_grad_(True)
    target, keep = _targets(input_ids, response_mask)
    with torch.enable_grad():
        hidden = hidden_fn(embeds, attention_mask)  # [B, L, H]
        logits = hidden[:, :-1].float() @ head_weight.detach().float().T  # [B, L-1, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * keep).sum()  # Σ_b L_b: each sample's inputs only reach its own loss
        (g,) = torch.autograd.grad(loss, embeds)  # [B, L, H]
    lookups = attention_mask > 0  # positions whose lookup passes a gradient to the table
    if padding_idx is not None:
        lookups = lookups & (input_ids != padding_idx)
    g = g.float() * lookups.unsqueeze(-1)
    same = (input_ids.unsqueeze(2) == input_ids.unsqueeze(1)) & lookups.unsqueeze(2) & lookups.unsqueeze(1)
    sq = (same * (g @ g.transpose(1, 2))).sum(dim=(1, 2))  # ‖A‖²: rows of one id add up before the norm
    if tied:  # + the output projection's part of the same tensor, and the cross term 2⟨A, B⟩
        e, h = _output_errors(hidden.detach()[:, :-1], head_weight.detach(), target, keep)  # [B, T, V], [B, T, H]
        e_at_inputs = e.gather(-1, input_ids.unsqueeze(1).expand(-1, e.shape[1], -1))  # [B, T, L]: E[s, x_t]
        cross = (e_at_inputs.transpose(1, 2) * (g @ h.transpose(1, 2))).sum(dim=(1, 2))
        sq = sq + _gram_sq(e, h) + 2.0 * cross
    return sq.clamp(min=0).sqrt()


def reference_grad_norms(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    param: torch.Tensor | Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """The reference's way, one sample at a time: a batch-1 forward and ``autograd.grad`` w.r.t. ``param``
    (one tensor, or several: the norm of them all together).

    Kept as the oracle for the fast paths (and for the benchmark); rows are unpadded before the forward.
    """
    out = torch.zeros(len(input_ids), dtype=torch.float32, device=input_ids.device)
    for b in range(len(input_ids)):
        valid = attention_mask[b] > 0
        ids, resp = input_ids[b][valid][None], response_mask[b][valid][None]
        with torch.enable_grad():
            logits = logits_fn(ids, torch.ones_like(ids))
            target, keep = _targets(ids, resp)
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            loss = -(logp * keep).sum()
            if reduction == "mean":
                loss = loss / keep.sum().clamp(min=1)
            grads = torch.autograd.grad(loss, [param] if isinstance(param, torch.Tensor) else list(param))
        out[b] = torch.stack([g.float().norm() for g in grads]).norm()
    return out


def all_grad_norms(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    root: torch.nn.Module,
    embed_weight: torch.Tensor,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tied: bool,
    reduction: str = "sum",
    padding_idx: int | None = None,
) -> torch.Tensor:
    """[B] norms of each sample's gradient w.r.t. EVERY trainable parameter of ``root``, from one batched
    forward and one batched backward to the input embeddings (no per-sample backward, no per-sample
    gradient tensors).

    Per-sample norms of a linear layer's gradient Σ_t g_t a_tᵀ come from the layer's inputs a_t and output
    gradients g_t as Σ_{t,s} ⟨g_t, g_s⟩⟨a_t, a_s⟩ (the Gram trick of the output projection, applied to every
    layer; "ghost norms"), its bias from ‖Σ_t g_t‖, an RMSNorm scale from ‖Σ_t g_t ⊙ x̂_t‖ with x̂ the
    normalised input, and the input table as in :func:`grad_norms` (tied: the shared tensor counted once,
    with the cross term). ``logits_fn(inputs_embeds, attention_mask)`` runs ``root``; ``head`` is its output
    projection (a ``Linear``). Supported modules with parameters: ``Linear``, ``Embedding`` (only as the input
    table) and RMSNorm-style scales (a ``weight`` of one dimension and a ``variance_epsilon``); others are
    refused by name.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is not 'sum' or 'mean'")
    batch = len(input_ids)
    sq = torch.zeros(batch, dtype=torch.float32, device=input_ids.device)
    state: dict[str, Any] = {"seen": [], "sq": sq, "head": None, "keep_head": tied}
    handles = []
    for name, module in root.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own or isinstance(module, torch.nn.Embedding):
            continue
        if isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif hasattr(module, "variance_epsilon") and [n for n, _ in module.named_parameters(recurse=False)] == [
            "weight"
        ]:
            kind = "rmsnorm"
        else:
            raise ValueError(
                f"grad_param=all: module {name!r} ({type(module).__name__}) has parameters of a kind whose "
                "per-sample gradient norm is not supported; use embed_tokens or lm_head"
            )
        handles.append(module.register_forward_hook(_ghost_hook(state, kind, module is head)))
    embeds = embed_weight.detach()[input_ids].clone().requires_grad_(True)
    target, keep = _targets(input_ids, response_mask)
    try:
        with torch.enable_grad():
            logits = logits_fn(embeds, attention_mask)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            (g_emb,) = torch.autograd.grad(-(logp * keep).sum(), embeds)
    finally:
        for h in handles:
            h.remove()
    if not embed_weight.requires_grad:  # a frozen input table has no gradient to count
        return _finish(sq, keep, reduction)
    # the input table: rows summed per token id, as autograd does
    lookups = attention_mask > 0
    if padding_idx is not None:
        lookups = lookups & (input_ids != padding_idx)
    g_emb = g_emb.float() * lookups.unsqueeze(-1)
    same = (input_ids.unsqueeze(2) == input_ids.unsqueeze(1)) & lookups.unsqueeze(2) & lookups.unsqueeze(1)
    sq += (same * (g_emb @ g_emb.transpose(1, 2))).sum(dim=(1, 2))
    if tied:  # one tensor, two uses: + 2⟨A, B⟩ with B = Σ_s g_s a_sᵀ the output projection's part
        if state["head"] is None:
            raise ValueError("grad_param=all: tied embeddings, but the output projection was never called")
        g_head, a_head = state["head"]  # [B, L, V], [B, L, H]
        at_inputs = g_head.gather(-1, input_ids.unsqueeze(1).expand(-1, g_head.shape[1], -1))  # [B, L, L]: g_s[x_t]
        sq += 2.0 * (at_inputs.transpose(1, 2) * (g_emb @ a_head.transpose(1, 2))).sum(dim=(1, 2))
    return _finish(sq, keep, reduction)


def _finish(sq: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    norms = sq.clamp(min=0).sqrt()
    return norms / keep.sum(dim=1).clamp(min=1) if reduction == "mean" else norms


def _ghost_hook(state: dict[str, Any], kind: str, is_head: bool):
    """A forward hook that keeps a module's input (normalised, for RMSNorm) until backward brings the gradient
    of its output, then adds the module's per-sample squared gradient norm to ``state["sq"]`` and lets both go
    (only the output projection's are kept, for the tied cross term). Positions are flattened, so inputs of
    any rank ([B, L, D] or [B, L, heads, D]) work."""

    def hook(module, args, output):
        if any(m is module for m in state["seen"]):
            raise ValueError(
                f"grad_param=all: a {type(module).__name__} ran twice in one forward; its per-sample gradient "
                "would be the sum over both calls, which these norms do not cover"
            )
        state["seen"].append(module)
        if not output.requires_grad:  # nothing upstream needs a gradient: this module contributes none
            return
        x = args[0].detach()
        if kind == "rmsnorm":
            xf = x.float()
            x = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        weight_counts = module.weight.requires_grad
        bias_counts = kind == "linear" and module.bias is not None and module.bias.requires_grad

        def on_grad(grad: torch.Tensor) -> None:
            b = grad.shape[0]
            g = grad.detach().float().reshape(b, -1, grad.shape[-1])  # [B, P, out]
            a = x.float().reshape(b, -1, x.shape[-1])  # [B, P, in]
            if kind == "linear":
                if weight_counts:
                    state["sq"] += ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
                if bias_counts:
                    state["sq"] += g.sum(dim=1).pow(2).sum(dim=1)
                if is_head and state["keep_head"]:
                    state["head"] = (g, a)
            elif weight_counts:
                state["sq"] += (g * a).sum(dim=1).pow(2).sum(dim=1)

        output.register_hook(on_grad)

    return hook
