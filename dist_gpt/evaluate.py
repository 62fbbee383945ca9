"""`python -m dist_gpt.evaluate`: the command lives in dist_gpt/tools/evaluate.py."""

from dist_gpt.tools.evaluate import main

if __name__ == "__main__":
    main()
