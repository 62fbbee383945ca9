"""Judging a model: the validation loss the loop logs.

    val_loss.py   mean loss over a fixed set of validation windows, the same on any world size

May import: core, data/, runtime/, parallel/, checkpoint/, interop/, engine/. Never: train/, tools/.
"""
