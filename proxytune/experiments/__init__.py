"""Experiments that run on the embedded model family (see :mod:`.alignment`)."""
