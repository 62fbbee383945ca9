"""`python -m dist_gpt.export`: the command lives in dist_gpt/tools/export.py."""

from dist_gpt.tools.export import main

if __name__ == "__main__":
    main()
