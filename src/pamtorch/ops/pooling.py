"""Pooling and resampling: PA implementations."""
from __future__ import annotations
