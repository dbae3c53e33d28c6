"""The LN-stability benchmark's parts (entry point: `experiments/ln_stability.py`).

    presets.py    quick / paper / micro: data, widths, the gradient-norm study, the grids
    data.py       batches from the offline stdlib corpus, shared by all runs
    gradnorm.py   per-layer gradient norms at initialization (eager or jitted)
    sweep.py      many training runs as one jit(vmap(...)) program, or one run alone
    analysis.py   divergence, spikes, the unigram plateau, steps to a target loss
    bench.py      what runs in which order, resumably; the vmap-vs-sequential check
    records.py    JSONL records (the unit of resumption)
    verdicts.py   one verdict per claim of Xiong et al. 2020, with its numbers
    report.py     summary.csv, gradnorm.csv, report.md
    plots.py      the PNG figures
"""
