"""Measurements outside the matrix, each a module run by a named call (bench/calls.yaml) or by hand:
`python -m bench.studies.NAME --help`. What each one measures: bench/studies/README.md."""
