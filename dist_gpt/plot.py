"""`python -m dist_gpt.plot`: the command lives in dist_gpt/tools/plot.py."""

from dist_gpt.tools.plot import main

if __name__ == "__main__":
    main()
