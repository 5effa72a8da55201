"""Sweeps: what is specific to many members in one file (training them is `saecli.runs.run_sweep`).

grid.py      sweep files → validated members with names and folders
grouping.py  members that share a stream (from the schema's stream keys); spreading over ranks
summary.py   the table of results and the sparsity–fidelity frontier plot
"""
