"""Sweeps: many dictionaries trained on one activation stream (see saecli/sweep/run.py).

    grid.py      sweep files → validated members with names and folders
    grouping.py  members that share a stream (from the schema's stream keys); spreading over ranks
    run.py       run_sweep: train every group, resume, per-member outputs
    summary.py   the table of results and the sparsity–fidelity frontier plot
"""
