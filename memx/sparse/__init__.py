"""MoA sparse attention: profile a trained model, search per-head length-elastic rules under a
density budget, save/apply plans, baselines (uniform window, LongGen), evaluation.

Modules: rules (span α + β·N, exact densities), profile (gradient influence per attention
tile), search (MILP / greedy), plan (JSON plans, apply, baselines), validate (MoA's Pareto plans
kept by measured loss; measured head costs; an LM-loss guard), evaluate, cli.
Import the modules directly; this package imports nothing (scipy loads only for search).
"""
