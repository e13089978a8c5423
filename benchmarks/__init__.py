"""`voxport bench`: speed of every artifact of a bundle, per component, backend, precision and input length.

`run.run_bench(cfg)` plans one job per artifact graph (plus end to end and time to first audio),
runs each job in its own subprocess (`worker.py`), and writes JSON, Markdown and PNG reports
(`report.py`); `compare.py` is the CI regression check against a baseline JSON.
"""
