"""`python -m dist_gpt.plan`: which strategy fits N GPUs of M GB; the planner lives in dist_gpt/autotune/plan.py, its command line in dist_gpt/tools/plan.py."""

from dist_gpt.tools.plan import main

if __name__ == "__main__":
    main()
