"""Toy world: a procedurally drawn world, a small text-to-image model trained on it, offline scorers, a benchmark.

Package-free of ComfyUI at import time (``scenes`` is numpy only); ``model`` and ``scorers`` import torch / comfy
lazily. Importable as ``personalize.toyworld`` inside the pack and as ``toyworld`` from the repo root (scripts).
"""
