"""`python -m dist_gpt.bench`: the command lives in dist_gpt/tools/bench.py."""

from dist_gpt.tools.bench import main

if __name__ == "__main__":
    main()
