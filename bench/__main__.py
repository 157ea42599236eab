"""`python -m bench`: the end-to-end bench (bench/run.py)."""
from bench.run import main
from cli import run

run(main)
