"""`python -m dist_gpt.doctor`: the command lives in dist_gpt/tools/doctor.py."""

from dist_gpt.tools.doctor import main

if __name__ == "__main__":
    main()
