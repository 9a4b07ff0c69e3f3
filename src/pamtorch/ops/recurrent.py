"""Recurrent layers: the fused RNN ops as PA cell loops."""
from __future__ import annotations
