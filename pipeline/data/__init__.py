"""Data in: dataset specs and layouts, image decoding, the Great Expectations checks and
the import of a source into the DVC-tracked ``data/`` folder."""
