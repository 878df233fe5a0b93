"""Workloads over images, served by a model pulled with its multimodal projector."""
