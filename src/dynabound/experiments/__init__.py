"""Reproduction harness for the AdaBound paper's experiments (the ``dynabound`` command)."""
