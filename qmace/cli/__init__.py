"""Command-line interface (``qmace`` console script, ``python -m qmace``)."""
