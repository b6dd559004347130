"""WTA-CRS: linear layers whose weight gradient is estimated from a sample of the input's rows.

For ``y = x W^T + b`` over n rows (all leading dimensions flattened: batch x tokens in a
ViT), the weight gradient is a sum over the rows, ``dW = sum_i dy_i^T x_i``. Storing x for
it is most of a transformer's activation memory. ``WTACRSLinear`` keeps a fixed number
``m = ceil(keep * n)`` of x's rows in the forward and estimates dW from them without bias:

- every row i gets an inclusion probability ``pi_i = min(1, lam * s_i)`` with
  ``sum_i pi_i = m`` (``keep_probabilities``): the rows of highest score s are kept for
  certain (the winners, pi = 1) and the rest share the remaining budget in proportion to s;
- exactly m rows are drawn with those inclusion probabilities by systematic sampling over
  a random order of the rows (``sample_rows``);
- the backward sums ``dy_i^T x_i / pi_i`` over the drawn rows. Since row i is drawn with
  probability pi_i, the expectation is ``sum_i pi_i dy_i^T x_i / pi_i = dW``: unbiased for
  any scores that give every row pi_i > 0, whatever dy turns out to be.

The scores must be fixed in the forward, before dy exists. The variance-optimal choice
would be ``s_i = ||dy_i|| ||x_i||`` (the norm of row i's term of dW); instead
``s_i = ||x_i|| * g_t``, where ``g_t`` is a running mean of ``||dy||`` at the row's position
t along the second-to-last input dimension (the token) over earlier backwards, floored at
5% of its mean so no row's probability vanishes. Tokens differ systematically (in a ViT
the class token's gradient dwarfs a patch token's, and in the last block only the class
token has one), samples of a batch do not, and the rows of one step are new samples: so
a per-token estimate is what earlier steps can tell. It starts at 1 (plain ``||x||``).

The input gradient ``dx = dy W`` needs no x and stays exact, as does the bias gradient
``sum_i dy_i``. With keep = 1, in eval mode, without grad and with a frozen weight the
layer is ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GRAD_NORM_MOMENTUM = 0.9  # weight of the previous estimate in the running mean of ||dy|| per token
GRAD_NORM_FLOOR = 0.05  # the per-token estimate used for the scores is at least this share of its mean


def row_budget(keep: float, rows: int) -> int:
    """Rows kept out of ``rows`` at fraction ``keep``: ceil(keep * rows), at least 1."""
    return min(rows, max(1, math.ceil(keep * rows)))


def keep_probabilities(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Inclusion probabilities ``pi_i = min(1, lam * scores_i)`` summing to ``budget`` (float64).

    The rows whose scores would ask for more than certainty are kept with pi = 1 and the
    rate ``lam`` is raised until the others fill the remaining budget. Scores must be > 0.
    No host synchronisation: the number of certain rows stays a tensor.
    """
    s = scores.double().flatten()
    n = s.numel()
    if budget >= n:
        return torch.ones_like(s)
    ordered = torch.sort(s, descending=True).values
    tail = ordered.flip(0).cumsum(0).flip(0)  # tail[c] = sum of all but the c largest
    c = torch.arange(budget, device=s.device)
    # With the c largest certain, the next one fits below 1 iff (budget - c) * s_(c) <= tail[c];
    # the left minus the right side never increases with c, so the count of c that fail is
    # the number of certain rows (at most budget - 1: c = budget - 1 always fits).
    certain = ((budget - c) * ordered[:budget] > tail[:budget]).sum().view(1)
    rate = (budget - certain) / tail.index_select(0, certain)
    return torch.clamp(rate * s, max=1.0)


def sample_rows(probabilities: torch.Tensor, budget: int, generator: torch.Generator | None = None):
    """Exactly ``budget`` distinct rows, row i included with probability ``probabilities[i]``.

    Systematic sampling over a random order: the probabilities (summing to ``budget``, each
    at most 1) are laid end to end as intervals in a random order, and the points u, u + 1,
    ..., u + budget - 1 (u uniform in [0, 1)) pick the intervals they fall in. An interval of
    length pi holds one point with probability exactly pi, and at most one. Returns the row
    indices and their weights 1 / pi. Inclusion is exact up to float64 rounding of the ends.
    """
    n = probabilities.numel()
    device = probabilities.device
    order = torch.randperm(n, device=device, generator=generator)
    ends = probabilities.double()[order].cumsum(0)
    u = torch.rand((), dtype=torch.float64, device=device, generator=generator)
    points = u + torch.arange(budget, dtype=torch.float64, device=device)
    rows = order[torch.searchsorted(ends, points, right=True).clamp_(max=n - 1)]
    return rows, probabilities.index_select(0, rows).reciprocal().float()


class _TokenGradNorms:
    """Running mean of ||dy|| per token position, the gradient half of the sampling scores."""

    def __init__(self):
        self.mean: torch.Tensor | None = None

    def factors(self, tokens: int, device: torch.device) -> torch.Tensor:
        if self.mean is None or self.mean.numel() != tokens or self.mean.device != device:
            self.mean = None  # a new sequence length or device: start again from plain ||x||
            return torch.ones(tokens, device=device)
        return torch.maximum(self.mean, GRAD_NORM_FLOOR * self.mean.mean())

    def update(self, norms: torch.Tensor) -> None:
        # A non-finite gradient (a step the trainer will stop at or skip) leaves the estimate as it was.
        if self.mean is None or self.mean.shape != norms.shape:
            self.mean = torch.where(torch.isfinite(norms), norms, torch.ones_like(norms))
        else:
            self.mean = torch.where(torch.isfinite(norms), self.mean.lerp(norms, 1 - GRAD_NORM_MOMENTUM), self.mean)


class _SampledLinear(torch.autograd.Function):
    """F.linear whose backward sums the weight gradient over a sample of the rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, keep: float, grad_norms: _TokenGradNorms):
        y = F.linear(x, weight, bias)  # under autocast: in its dtype, as nn.Linear would run
        rows = x.reshape(-1, x.shape[-1])
        tokens = x.shape[-2] if x.dim() >= 3 else 1
        budget = row_budget(keep, rows.shape[0])
        scores = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).view(-1, tokens)
        scores = scores * grad_norms.factors(tokens, x.device)
        # A row of zeros adds nothing to dW; the floor only keeps its probability above 0.
        scores = scores.flatten().clamp_min(torch.finfo(torch.float32).tiny)
        kept, row_weights = sample_rows(keep_probabilities(scores, budget), budget)
        ctx.save_for_backward(rows.index_select(0, kept).to(y.dtype), kept, row_weights, weight)
        ctx.x_shape, ctx.x_dtype, ctx.tokens, ctx.has_bias = x.shape, x.dtype, tokens, bias is not None
        ctx.grad_norms = grad_norms
        return y

    @staticmethod
    def backward(ctx, dy):
        x_kept, kept, row_weights, weight = ctx.saved_tensors
        dy_rows = dy.reshape(-1, dy.shape[-1])
        norms = torch.linalg.vector_norm(dy_rows, dim=1, dtype=torch.float32).view(-1, ctx.tokens).mean(0)
        ctx.grad_norms.update(norms)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy_rows @ weight.to(dy_rows.dtype)).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            scaled = (dy_rows.index_select(0, kept).float() * row_weights[:, None]).to(x_kept.dtype)
            dw = (scaled.t() @ x_kept).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_rows.sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, db, None, None


class WTACRSLinear(nn.Linear):
    """``nn.Linear`` that stores a ``keep`` fraction of its input's rows for the weight gradient.

    The forward and the input and bias gradients are the ordinary ones; the weight
    gradient is an unbiased estimate (see the module docstring). Parameters and state dict
    are nn.Linear's, so checkpoints move freely between the two.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, keep: float, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        if not 0 < keep <= 1:
            raise ValueError(f"WTA-CRS keep fraction must be in (0, 1], got {keep}")
        self.keep = keep
        self.grad_norms = _TokenGradNorms()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep >= 1 or not self.training or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)  # keeps x only where dW needs it
        return _SampledLinear.apply(x, self.weight, self.bias, self.keep, self.grad_norms)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}"
