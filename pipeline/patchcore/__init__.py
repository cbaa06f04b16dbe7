"""The algorithm: PatchCore (Roth et al., CVPR 2022) and its memory-bank artifact.

Backbone and locally aware patch features, greedy k-center coreset, nearest-neighbour
search, Eq. 7 scoring and anomaly maps, the estimator that ties them together, and the
hash-verified bank on disk. Arrays in, arrays out: this room imports nothing from the other
rooms of :mod:`pipeline` (only :mod:`pipeline.config` and the package version).
"""
