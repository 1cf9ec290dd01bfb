"""The slow, obvious computation every score is checked against.

Two separately loaded models (base and a merged fine-tuned copy), one sequence at a time,
no padding, no cache, full depth with every hidden state and the full LM head; metrics in
float64. Each sequence is one full forward pass under the model's own attention mask, so a
sliding-window model applies its window exactly as it does on the unpadded sequence.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def naive_scores(
    base_model,
    finetuned_model,
    prompt_ids: Sequence[int],
    responses: Sequence[Sequence[int]],
    layers: Sequence[int],
) -> dict:
    """``{"latent_sim": {L: [...]}, "kl": [...], "perplexity": [...], "self_certainty": [...]}``."""
    out = {"latent_sim": {layer: [] for layer in layers}, "kl": [], "perplexity": [], "self_certainty": []}
    for response in responses:
        ids = torch.tensor([list(prompt_ids) + list(response)])
        with torch.no_grad():
            ft = finetuned_model(input_ids=ids, output_hidden_states=True, use_cache=False)
            base = base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
        for layer in layers:
            a = ft.hidden_states[layer][0, -1].double()
            b = base.hidden_states[layer][0, -1].double()
            out["latent_sim"][layer].append(float(a @ b / (a.norm() * b.norm())))
        if not response:
            for metric in ("kl", "perplexity", "self_certainty"):
                out[metric].append(None)
            continue
        start = len(prompt_ids) - 1  # the prompt's last position predicts the first response token
        log_p = torch.log_softmax(ft.logits[0, start:-1].double(), dim=-1)
        log_q = torch.log_softmax(base.logits[0, start:-1].double(), dim=-1)
        targets = torch.tensor(list(response))
        vocab = log_p.shape[-1]
        kl_per_token = [float((log_p[t].exp() * (log_p[t] - log_q[t])).sum()) for t in range(len(response))]
        nll_per_token = [float(-log_p[t, targets[t]]) for t in range(len(response))]
        uniform_kl = [float((1.0 / vocab) * (-math.log(vocab) - log_p[t]).sum()) for t in range(len(response))]
        out["kl"].append(sum(kl_per_token) / len(response))
        out["perplexity"].append(math.exp(sum(nll_per_token) / len(response)))
        out["self_certainty"].append(sum(uniform_kl) / len(response))
    return out
