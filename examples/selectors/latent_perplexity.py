"""A Best-of-N score of your own, registered without changing dabon: latent similarity plus a
weighted log-perplexity, argmin (far from the base model *and* fluent under the fine-tuned one).

Use it from a recipe (evaluation or serving)::

    scoring:
      plugins: ["examples.selectors.latent_perplexity:LatentPerplexity"]
      metrics: [latent_perplexity]        # evaluation: latent_sim and perplexity come with it
      rule: latent_perplexity             # serving: rank by it

or ``dabon score ... --plugins examples.selectors.latent_perplexity:LatentPerplexity --metrics
latent_perplexity --rule latent_perplexity``. The module must be importable where the scorer runs
(the repository root on ``PYTHONPATH``, or the job's ``working_dir``).

For candidate ``i`` at layer ``L``: ``latent_sim[L][i] + WEIGHT * log(perplexity[i])``; an empty
candidate (no perplexity) has no score, so it is ranked after every scored one.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from actors.scores import DerivedScore


class LatentPerplexity(DerivedScore):
    """``latent_sim + WEIGHT * log(perplexity)`` per layer (see module doc)."""

    name = "latent_perplexity"
    direction = "min"
    per_layer = True
    requires = ("latent_sim", "perplexity")
    label = "latent sim + 0.1 log perplexity"
    WEIGHT = 0.1

    def combine(self, scores: dict[str, Any], empty: Sequence[bool], layer: int | None) -> list[float | None]:
        latent, perplexity = scores["latent_sim"][layer], scores["perplexity"]
        return [None if ppl is None else sim + self.WEIGHT * math.log(ppl) for sim, ppl in zip(latent, perplexity)]
