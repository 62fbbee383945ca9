"""`python -m dist_gpt.sample`: the command lives in dist_gpt/tools/sample.py."""

from dist_gpt.tools.sample import main

if __name__ == "__main__":
    main()
