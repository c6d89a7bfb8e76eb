"""HFPrune Studio engine: entropy-Taylor structured pruning of transformer MLPs (no gradio here).

Module map, in pipeline order load → calibrate → score → allocate → prune → compensate → export →
quantize → measure, then runs and the command line. Imports go one way: nothing here imports
``core.cli``.

  errors.py          user-facing errors (HFPruneError and subclasses: one clear sentence each)
  paths.py           cache / runs / data folders; atomic folder creation
  models.py          load model + tokenizer (embedded alias, hub id, folder, GGUF)                 [load]
  adapters.py        per-architecture MLP handles (gate / up / down of each decoder layer)
  data.py            text sources, calibration / evaluation splits, token windows                  [calibrate]
  scoring.py         hook machinery: loss → per-neuron Taylor scores                               [score]
  criteria.py        importance criteria + registry
  score_stats.py     per-layer score summaries, histograms, ranks, Spearman, removal-set overlap
  allocate.py        uniform / global widths, ratio checks, top-k kept indices                     [allocate]
  adaptive.py        adaptive (AMP) width search
  prune.py           slicing (prune_mlp_neurons) and pruned_view                                   [prune]
  compensate.py      least-squares down_proj refit                                                 [compensate]
  engine.py          the top-level calls: score_model, prune_with_scores, ScoreResult, plan_widths
  export.py          save pruned models (hf-native / hf-remote-code / hf-padded)                   [export]
  remote_code.py     the hf-remote-code modeling file
  quantize.py        quantization backends and applying them                                       [quantize]
  quant_store.py     quantized folders: recipe files, save_quantized, load_any
  counts.py          analytic parameter / FLOP / byte counts, the prune preview, Pareto front      [measure]
  outputs.py         what models say: seeded generation, next-token menus, per-token KL along a text
  evaluate.py        perplexity + fidelity to a reference on evaluation windows
  sweep.py           criteria × ratio fidelity sweep
  speed.py           measured latency / memory
  zeroshot.py        lm-eval runs; zeroshot_tasks.py builds the shipped offline tasks
  runs.py            the run store                                                                 [runs]
  cli/               python -m core: __init__ (main, parser, GROUPS); prune (score, prune,         [cli]
                     eval, models), quantize, zeroshot, speed (bench)
"""
__version__ = "0.1.0"
