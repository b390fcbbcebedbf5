"""Triton kernels of proxytune (importing nothing from proxytune).

``sample_next_tokens`` fuses the steering offsets, repetition penalty, temperature,
top-k / top-p / min-p and the draw of the next token in a few passes over the
vocabulary; see :mod:`kernels.steer_sample`.  Importing this package needs
``triton``; on a CPU set ``TRITON_INTERPRET=1`` before importing it.
"""

from kernels.steer_sample import NUM_PIVOTS, SteerPair, default_block, sample_next_tokens

__all__ = ["NUM_PIVOTS", "SteerPair", "default_block", "sample_next_tokens"]
