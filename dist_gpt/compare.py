"""`python -m dist_gpt.compare`: the command lives in dist_gpt/tools/compare.py."""

from dist_gpt.tools.compare import main

if __name__ == "__main__":
    main()
