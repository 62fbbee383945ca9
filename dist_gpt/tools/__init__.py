"""The command-line tools behind `python -m dist_gpt.X` (each top-level dist_gpt/X.py is a two-line shim):

    prepare.py   text -> train.bin / val.bin          sample.py   generate from a run or an export
    export.py    a run -> .safetensors or --hf DIR     bench.py    tokens/s, MFU, the step split, peak memory
    doctor.py    the machine's checks, one table       runs.py     a run directory read back (metrics, config)
    plot.py      loss curves of runs side by side      compare.py  runs side by side: losses, speed, config diffs
    plan.py      the planner's table and command line (the planning: autotune/plan.py)

May import everything in the package except the top-level shims.
"""
