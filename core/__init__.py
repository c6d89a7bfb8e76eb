"""HFPrune Studio engine: entropy-Taylor structured pruning of transformer MLPs (no gradio here).

Module map, in pipeline order load → calibrate → score → allocate → prune → compensate → export →
quantize → measure, then training, runs and the command line. Imports go one way: engine modules
never import ``core.cli``. Imports sit at the top of each file; the only ones inside functions are the
optional or heavy backends (gguf, onnx/onnxruntime, peft, bitsandbytes, torchao and torch.ao, lm-eval,
scikit-learn/-image, scipy, plotly, matplotlib, accelerate, gensim) and transformers' model classes
(importing one loads transformers' whole modeling stack: seconds, plus torchao's load warnings), and
the two that close an import cycle (models/export ↔ gguf_export), marked where they are.

  shared
    errors.py          user-facing errors (HFPruneError subclasses, one sentence each); Stopped for stop checks
    paths.py           cache / runs / data folders
    files.py           atomic writes (text, json, bytes, safetensors, folders); per-layer tensor files
    options.py         typed option groups + the Knob mechanism (CLI flags, UI ranges, stored fields)
    progress.py        stop checks (check_stop raises errors.Stopped); quiet third-party loggers
    metrics.py         log-probs, entropy, KL, NLL, top-k overlap in fp32 row chunks (one home)
    distributed.py     torch.distributed process group, rank shards, all-reduce (data parallelism)
    placement.py       device, dtype, device_map="auto", memory estimates and refusals
    timing.py          rough wall-time estimates of long jobs
  load
    models.py          load model + tokenizer (embedded alias, hub id, folder, GGUF)
    adapters.py        per-architecture MLP handles (gated gate/up/down or plain fc1/fc2)
    encoders.py        encoders to prune (DINOv2, MiniLM, ViT, CLIP-vision)
    images.py          the encoders' offline images (scikit-image samples, LFW, digits) and crops
  calibrate
    data.py            text sources, calibration / evaluation splits, token windows
  score
    scoring.py         hook machinery: loss → per-neuron Taylor scores
    criteria.py        importance criteria + registry
    score_stats.py     per-layer summaries, histograms, ranks, Spearman, removal-set overlap
    neuron.py          one neuron up close: ranks, top contexts, ablation effect
    stability.py       rank stability over disjoint calibration draws
  allocate
    allocate.py        uniform / global widths, ratio checks, AllocationOptions
    adaptive.py        adaptive (AMP) width search
    ddp.py             deterministic differentiable pruning: learned gates on core.train, exact top-k
  prune
    prune.py           slicing (prune_mlp_neurons, prune_attention_heads) and pruned_view
    engine.py          the top-level calls: score_model, plan_widths, prune_with_scores, ScoreResult
    vision.py          AMP for encoders: score, allocate, prune and distil
  compensate
    compensate.py      least-squares down_proj refit
  export
    export.py          save pruned models (hf-native / hf-remote-code / hf-padded), zip
    remote_code.py     the hf-remote-code modeling file
    gguf_export.py     one .gguf file for llama.cpp / Ollama
  quantize
    quantize.py        quantization backends and applying them (backends imported only here)
    quant_store.py     quantized folders: recipe files, save_quantized, load_any
  measure
    counts.py          analytic parameter / FLOP / byte counts, prune preview, Pareto front
    outputs.py         what models say: seeded generation, next-token menus, per-token KL along a text
    evaluate.py        perplexity + fidelity to a reference (Reference: the dense pass computed once)
    sweep.py           criteria × allocation × ratio fidelity sweep (dashboard and benchmarks/criteria.py)
    speed.py           measured latency / memory
    zeroshot.py        lm-eval runs on the shipped offline tasks
    zeroshot_tasks.py  builds those tasks (wiki cloze / next sentence) from the evaluation articles
    vision_metrics.py  encoder quality: feature fidelity, kNN / linear probe, retrieval, size, throughput
  training
    train.py           the training engine (student, teacher, objective, parameter set, budget)
    recover.py         recovery recipes on top of train.py (full / mlp / lora, merge)
    pipeline.py        prune → quantize → distil in any order, its export and the six-order ablation
  runs
    runs.py            the run store
    report.py          a stored run as one self-contained HTML file
  cli
    __main__.py        entry point of python -m core
    cli/__init__.py    main(), build_parser(), GROUPS; one module per subcommand group: prune (score,
                       prune, eval, models), quantize, zeroshot, speed (bench), inspector (neuron,
                       stability, report), recover, data, ddp, pipeline, vision (vision-eval)
"""
__version__ = "0.1.0"
