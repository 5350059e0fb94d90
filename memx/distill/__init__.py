"""Distillation of trained Transformers into Mamba-2 and hybrid students (the mmMamba recipe).

config.py   DistillConfig: student layout and seeding, the three stages, data
seed.py     attention → Mamba-2 weight seeding (the mapping table), student configs and models
capture.py  the frozen teacher's forward with each layer's mixer input and output; calibration
losses.py   layer-wise MSE, KL(teacher ‖ student), top-1 agreement
stages.py   trainable masks, the distillation step, one stage's run directory
runner.py   checks, seeding and the stage sequence (the library form of `memx distill`)
speed.py    prefill / decode time, memory and state bytes vs length (bench_distill, experiment)
cli.py      `memx distill TEACHER --student linear|hybrid[:every=4] [--stages 1,2,3]`
sweep_entry.py  a sweep entry with distill.* keys: distils an earlier entry's trained run
"""
