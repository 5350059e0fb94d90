"""Logical → mesh axis rule tables, one per ParallelConfig.strategy."""

from memx.parallel.axes import BATCH

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Axes not named here are replicated. "dp": parameters replicated, batch split over "data".
RULES: dict[str, Rules] = {
    "dp": ((BATCH, "data"),),
}
