"""Data: jagged interaction sequences, built-in synthetic data sets, MovieLens / CSV readers."""
