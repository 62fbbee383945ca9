"""One build path and one step, shared by the trainer, the bench and the autotuner's trials.

    build.py       config + process -> strategy wrapping the model (from scratch or model.init_from) + AdamW
    step.py        one optimizer step: micro-batches -> clip -> update (skipped when not finite)
    step_guard.py  when skipped steps mean divergence
    schedule.py    the cosine learning rate with warmup

May import: core, data/, runtime/, parallel/, checkpoint/, interop/. Never: autotune/, eval/, train/, tools/.
"""
