"""The LN-stability benchmark's parts (entry point: `experiments/ln_stability.py`).

    presets.py    micro / quick / gpu / paper: data, widths, the gradient-norm study, the grids
    data.py       batches (BERT, GPT, translation) from the offline corpus, shared by all runs
    gradnorm.py   per-layer norms of the mean gradient at initialization (Fig. 3)
    sweep.py      many training runs as one jit(vmap(...)) program, or one run alone
    analysis.py   divergence, spikes, the unigram plateau, steps to a target loss
    bench.py      what runs in which order, resumably; the vmap-vs-sequential check
    records.py    JSONL records (the unit of resumption)
    verdicts.py   supported / refuted / inconclusive per claim of Xiong et al. 2020
    report.py     summary.csv, gradnorm.csv, report.md
    plots.py      the PNG figures
"""
