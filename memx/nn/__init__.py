"""Flax NNX layers. Modules hold parameters (tagged with logical axes); kernels do the compute."""
