"""Benchmark tools behind ``nnunetv2_lgms profile``, ``compare`` and ``evaluate-unseen``.

One concept per module: :mod:`.models` (datasets, plans, trainer classes and networks exactly as nnU-Net builds them),
:mod:`.profiling` (params, FLOPs, timings and memory, interleaved over trainers), :mod:`.stats` (fold aggregation and
the paired Wilcoxon test), :mod:`.comparison` (cross-validation tables from nnU-Net's ``summary.json`` files),
:mod:`.unseen` (a trained model on a converted unseen dataset, scored with nnU-Net's metrics) and :mod:`.tables`
(Markdown/CSV formatting).
"""
