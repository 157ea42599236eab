"""Stage 1 of the pipeline: a folder of labelled photos -> validated, split FFCV + DALI shards.

build.py (the command) runs scan -> validate (in worker processes) -> dedup -> split -> beton + shards;
layout.py is the on-disk contract the loaders read; demo.py makes the 500px-like demo source.
"""
