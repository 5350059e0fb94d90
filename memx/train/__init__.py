"""Train state, jit'd step, loop, evaluation, metrics and memory accounting."""
