"""Helpers shared by the training, feature-extraction and sampling scripts."""
