"""Meshes, logical axis rules and (later) sequence-parallel building blocks; knows no models."""
