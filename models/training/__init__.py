"""Training code for the shipped model bundles (run with ``make models``; needs the ``train`` extra)."""
