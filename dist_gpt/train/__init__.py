"""A training run, top to bottom: what `launch/train.py` starts.

    run.py          join the group, settle micro_batch_size=auto (autotune/), hand over to the loop
    loop.py         the loop: train_step -> metrics -> eval -> checkpoint
    run_lock.py     one run per run directory (flock)
    time_budget.py  train.time_limit: stop and save while there is time

May import everything below it (core, data/, runtime/, parallel/, checkpoint/, interop/, engine/, autotune/,
eval/). Never: tools/.
"""
