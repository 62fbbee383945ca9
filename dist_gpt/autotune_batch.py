"""`python -m dist_gpt.autotune_batch` (the documented name; the autotuner is the package dist_gpt.autotune):
the largest micro-batch that fits the device's memory, measured. `--help` says how."""

from dist_gpt.autotune.__main__ import main

if __name__ == "__main__":
    main()
