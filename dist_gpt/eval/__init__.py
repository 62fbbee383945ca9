"""Judging a model: the validation loss the loop logs, and benchmark tasks scored as the GPT-2 reproductions score them.

    val_loss.py   mean loss over a fixed set of validation windows, the same on any world size
    hellaswag.py  HellaSwag: the file (downloaded once, or a local copy), the items, acc and acc_norm
    tasks.py      train.eval_tasks in the loop: every rank scores its share, the counts summed over ranks

May import: core, data/, runtime/, parallel/, checkpoint/, interop/, engine/. Never: train/, tools/.
"""
