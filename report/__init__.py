"""Everything fastpix reports, in one place, shared by train.py, bench/ and the study.

`metrics`: test metrics with bootstrap intervals and rolling statistics. `runlog`: a run's metrics.jsonl
(read, append, trim on resume). `plots`: every PNG, saved one way (`plots.save`, one dpi). `render`: a run
folder's pictures and tables from its files (`python -m report RUN_DIR`, `__main__`).
"""
