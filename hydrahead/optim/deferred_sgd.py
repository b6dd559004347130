"""The SGD steps that rows outside a step's active set are owed, applied when next read.

With active-class selection a step computes gradients for a few rows of the shard. Full
SGD would still move every other row: a zero gradient plus weight decay goes into the
momentum buffer, and the buffer into the weight. For one row those zero-gradient steps are
a linear map of (weight, buffer), the same for every row and every element:

    b_j = mu b_{j-1} + wd w_{j-1}          [w_j]   [1 - lr_j wd   -lr_j mu] [w_{j-1}]
    w_j = w_{j-1} - lr_j b_j          =>   [b_j] = [wd             mu     ] [b_{j-1}]

so a row that sat out n steps owes the product of the last n such 2x2 matrices. This keeps
them in a table (lag -> product, float64) that each applied step extends by one matrix,
and the update count at which each row was last current. A row's debt is paid when it is
next active (``catch_up``, before the loss reads it) or when every row must be exact
(``settle``: evaluation, prediction, and at the latest every ``max_lag`` steps, which
bounds the table). The result is torch.optim.SGD's trajectory for a gradient that is
zero outside the active rows, up to the rounding of applying a product instead of its
factors one by one.

That rounding depends on where the products are cut, so checkpoints do not settle: they
save each row's debt and the table (``state_dict``), and a resumed run owes exactly what
the saved one owed (``pay_owed_steps`` pays a checkpoint's debts for the tools that read it).
"""

from __future__ import annotations

import torch

from hydrahead.optim.low_precision import FORMATS, round_nearest

__all__ = ["MAX_LAG", "DeferredSGD", "pay_owed_steps"]

MAX_LAG = 4096  # the longest debt a table holds: every row settles at least this often

_SETTLE_ROWS = 1 << 18  # rows settled per pass: bounds the float32 temporaries


class DeferredSGD:
    """Zero-gradient SGD steps owed by the rows of one shard (C_r rows)."""

    def __init__(
        self,
        num_rows: int,
        *,
        momentum: float,
        weight_decay: float,
        device,
        max_lag: int = MAX_LAG,
        settle_every: int | None = None,
    ):
        """``max_lag``: the longest debt the table holds; ``settle_every``: settle at the latest
        when the oldest debt is this many steps old (None: ``max_lag``; at most ``max_lag``)."""
        if max_lag < 1:
            raise ValueError(f"max_lag must be >= 1, got {max_lag}")
        if settle_every is not None and not 1 <= settle_every <= max_lag:
            raise ValueError(f"settle_every must be in [1, {max_lag}], got {settle_every}")
        self.momentum, self.weight_decay, self.max_lag = momentum, weight_decay, max_lag
        self.settle_every = max_lag if settle_every is None else settle_every
        self.updates = 0  # applied steps so far
        self.row_updates = torch.zeros(num_rows, dtype=torch.int32, device=device)  # when each row was last current
        self.oldest = 0  # every row is current at least as of this step
        # table[n]: product of the last n maps, kept where the rows are (read at every catch-up)
        self.table = torch.eye(2, dtype=torch.float64, device=device).repeat(max_lag + 1, 1, 1)

    def to(self, device) -> None:
        """Keep the row counts and the table where the rows are."""
        self.row_updates, self.table = self.row_updates.to(device), self.table.to(device)

    @property
    def owing(self) -> bool:
        """Whether any row lags behind the applied steps."""
        return self.oldest < self.updates

    @property
    def must_settle(self) -> bool:
        return self.updates - self.oldest >= self.settle_every

    def record_step(self, lr: float, active_rows: torch.Tensor | None) -> None:
        """One applied step at ``lr``: ``active_rows`` took it for real (None: every row did)."""
        # table[n] <- step @ table[n-1], the 2x2 product written out with Python scalars: a
        # step matrix built on the host would be a blocking copy (a sync) every step.
        (a, b), (c, d) = (1.0 - lr * self.weight_decay, -lr * self.momentum), (self.weight_decay, self.momentum)
        top, bottom = self.table[:-1, 0], self.table[:-1, 1]
        table = torch.empty_like(self.table)
        table[0] = self.table[0]
        torch.add(top * a, bottom, alpha=b, out=table[1:, 0])
        torch.add(top * c, bottom, alpha=d, out=table[1:, 1])
        self.table = table
        self.updates += 1
        if active_rows is None:
            self.row_updates.fill_(self.updates)
            self.oldest = self.updates
        else:
            self.row_updates.index_fill_(0, active_rows.to(self.row_updates.device), self.updates)

    def _apply(self, rows, weight: torch.Tensor, buffer: torch.Tensor | None):
        """(weight, buffer) of ``rows`` (an index or a slice) after the maps they owe."""
        return pay_owed_steps(weight, buffer, self.updates - self.row_updates[rows], self.table)

    # ------------------------------------------------------------------------------------
    # Checkpoints: a save must not settle (where a run settles changes its last bits), so
    # it stores the debts instead, and a resumed run owes exactly what the saved one did.
    # ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``owed_steps`` (int32 per row: steps the row sat out since it was last current),
        ``maps`` (the table) and ``since_settled`` (steps since every row was current; the
        same on every rank)."""
        return {
            "owed_steps": (self.updates - self.row_updates).to(torch.int32),
            "maps": self.table,
            "since_settled": torch.tensor(self.updates - self.oldest, dtype=torch.int64),
        }

    def empty_state_dict(self) -> dict:
        """Tensors shaped like ``state_dict()``, for a checkpoint load to fill."""
        return {key: torch.empty_like(value) for key, value in self.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        since_settled = int(state["since_settled"])
        owed = state["owed_steps"].to(device=self.row_updates.device, dtype=torch.int32)
        if owed.shape != self.row_updates.shape or state["maps"].shape != self.table.shape:
            raise ValueError(
                f"deferred steps for {tuple(owed.shape)} rows and a table of {tuple(state['maps'].shape)}; "
                f"this shard has {tuple(self.row_updates.shape)} rows and a table of {tuple(self.table.shape)}"
            )
        # Only differences of update counts matter: count from the last time every row was current.
        self.updates, self.oldest = since_settled, 0
        self.row_updates = since_settled - owed
        self.table = state["maps"].to(device=self.table.device, dtype=torch.float64)

    @torch.no_grad()
    def catch_up_(self, rows: torch.Tensor, weight_rows: torch.Tensor, buffer_rows: torch.Tensor | None) -> bool:
        """Pay the debt of ``rows`` on their copies ``weight_rows`` / ``buffer_rows`` in place;
        False when nothing was owed (the copies are untouched).

        The caller writes the copies back after the step and ``record_step`` marks the rows
        current, so the debt is not paid twice.
        """
        if not self.owing or rows.numel() == 0:
            return False
        w, b = self._apply(rows, weight_rows, buffer_rows)
        weight_rows.copy_(w)
        if buffer_rows is not None:
            buffer_rows.copy_(b)
        return True

    @torch.no_grad()
    def paid_rows(self, weight: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        """Every row's weight after the steps it owes, rounded to nearest in the rows' own
        dtype (exact for float32 and float64 rows), leaving the stored rows and the debts as
        they are: where the next loss will read each row. One new tensor like ``weight``, paid
        ``_SETTLE_ROWS`` rows at a time; the same dtype whether or not anything is owed, so
        ranks that exchange these rows (graph builds) agree on their size."""
        paid = torch.empty_like(weight)
        for start in range(0, weight.shape[0], _SETTLE_ROWS):
            rows = slice(start, min(start + _SETTLE_ROWS, weight.shape[0]))
            paid[rows] = _nearest_in(weight.dtype, self._apply(rows, weight[rows], _rows_of(buffer, rows))[0])
        return paid

    @torch.no_grad()
    def settle_(self, weight: torch.Tensor, buffer: torch.Tensor | None, write_rows=None) -> None:
        """Pay every row's debt in place; afterwards all rows are current.

        ``write_rows(rows, values)``, if given, stores the new weights of ``rows`` (row
        numbers) itself: a low-precision store rounds them its own way. It gets only the rows
        that owe steps (found with one host read): storing the others would round them again.
        """
        if not self.owing:
            return
        if write_rows is not None:
            owing = torch.nonzero(self.row_updates < self.updates).squeeze(1)
            chunks = (owing[start : start + _SETTLE_ROWS] for start in range(0, owing.numel(), _SETTLE_ROWS))
        else:  # round to nearest, every row: one that owes nothing is stored as it was
            chunks = (slice(start, start + _SETTLE_ROWS) for start in range(0, weight.shape[0], _SETTLE_ROWS))
        for rows in chunks:
            w, b = self._apply(rows, weight[rows], _rows_of(buffer, rows))
            if write_rows is not None:
                write_rows(rows, w)
            else:
                weight[rows] = _nearest_in(weight.dtype, w)
            if buffer is not None:
                buffer[rows] = b.to(buffer.dtype)
        self.mark_settled()

    def mark_settled(self) -> None:
        """Every row is current: its debts were paid into the stored rows (a settle done
        elsewhere, such as ``hydrahead.kernels.deferred.pay_rows_in_place``)."""
        self.row_updates.fill_(self.updates)
        self.oldest = self.updates


def _rows_of(buffer: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if buffer is None else buffer[rows]


def _nearest_in(dtype: torch.dtype, values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to nearest in ``dtype`` (a low-precision storage format or a torch dtype)."""
    return round_nearest(values, dtype) if dtype in FORMATS else values.to(dtype)


def pay_owed_steps(weight: torch.Tensor, buffer: torch.Tensor | None, owed_steps: torch.Tensor, maps: torch.Tensor):
    """(weight, buffer) of rows that owe ``owed_steps`` zero-gradient steps, after paying them
    with ``maps`` (``DeferredSGD``'s table), in float32 (float64 for float64 rows). The
    buffer is None without momentum (it is 0 between steps; only the decay of w remains)."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    owed = maps[owed_steps.to(device=maps.device, dtype=torch.long)].to(device=weight.device, dtype=dtype)
    w = weight.to(dtype)
    if buffer is None:
        return owed[:, 0, 0, None] * w, None
    b = buffer.to(dtype)
    return (owed[:, 0, 0, None] * w + owed[:, 0, 1, None] * b), (owed[:, 1, 0, None] * w + owed[:, 1, 1, None] * b)
