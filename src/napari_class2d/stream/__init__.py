"""Streaming 2D classification: watch a folder or a growing STAR file."""
