"""Meshes, logical-axis rule tables, activation constraints and sequence-parallel attention.

Knows no models: axes.py (logical names), rules.py (logical → mesh axes, one table per
strategy), config.py (ParallelConfig), mesh.py (meshes, batch shardings, distributed start-up),
constrain.py (activation constraints, the sharding context), validate.py (even splits),
sequence.py (ring and all-to-all attention).
"""
