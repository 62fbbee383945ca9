"""`python -m dist_gpt.prepare`: the command lives in dist_gpt/tools/prepare.py."""

from dist_gpt.tools.prepare import main

if __name__ == "__main__":
    main()
