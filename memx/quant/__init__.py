"""Post-training weight quantization: GPTQ and round-to-nearest (gptq.py), applied to a trained
model's projections layer by layer on calibration data (model.py)."""
