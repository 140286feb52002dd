"""Experiments built on the library, not part of it: studies and drivers that use only its public API.

    bias.py              does the Explainer reveal a classifier's spurious background cue? (`explainer bias`)
    demo.py              `make demo`: the whole method on synthetic scenes, through the real commands (`explainer demo`)
    channel_dynamics.py  why a class channel of the Explainer dies: a trainer Recipe that records per-class statistics

A new experiment goes here; the library (explainer/*) never imports from this package.
"""
