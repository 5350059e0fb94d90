"""Meshes, logical-axis rule tables, activation constraints, sequence-parallel attention/scans.

Knows no models: axes.py (logical names), rules.py (logical → mesh axes, one table per
strategy), config.py (ParallelConfig), mesh.py (meshes, batch shardings, distributed start-up),
constrain.py (activation constraints, the sharding context), validate.py (even splits),
sequence.py (ring and all-to-all attention), sequence_scan.py (sequence-sharded
SSD, linear attention and linear_scan: local scans, a log-depth exchange of (decay, state)
pairs, analytic output correction; conv halos).
"""
