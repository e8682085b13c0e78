"""Offline tools: train, evaluate and export models into the model repository (models/)."""
