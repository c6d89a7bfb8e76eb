"""Copy the benchmark tables from ``benchmarks/results/*.md`` into docs/benchmarks.md between the markers.

    python benchmarks/readme_tables.py

Only the text between ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` is rewritten; the
page's introduction and its summary of what the tables say stay as written (README.md keeps a one-table
digest that links to the sections here). Each section names the command that produced it; a result file
that does not exist yet is listed as "not measured yet" rather than left out silently. Links point from
docs/ back up to ``benchmarks/results/``.
"""
from __future__ import annotations

import re

from _common import RESULTS, ROOT, write_text

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
PAGE = ROOT / "docs" / "benchmarks.md"
LINK = "../benchmarks/results"  # the result files as seen from docs/

SECTIONS = [
    ("Scoring cost (target: ≤ 0.9× reference-style, within 10% of frozen forward+backward)", "scoring.md",
     "python benchmarks/scoring.py --samples 8 --seq-len 256 --batch-size 4 --repeats 2"),
    ("Sanity anchor: entropy vs cross-entropy vs random, uniform", "fidelity_anchor.md",
     "python benchmarks/fidelity_anchor.py --samples 16 --seq-len 256 --eval-windows 8"),
    ("Criteria × allocation, SmolLM2-135M", "criteria_smollm2-135m.md", None),
    ("Criteria × allocation, Gemma-3-270M", "criteria_gemma3-270m.md", None),
    ("Gemma-3-270M, adaptive search on a 4× larger held-out slice (8 × 64)", "criteria_gemma3-270m_heldout8x64.md",
     None),
    ("Gemma-3-270M, compensation checked on a 4× longer evaluation (16 × 128)", "criteria_gemma3-270m_eval16x128.md",
     None),
    ("Quantization × pruning: quality", "quantize_cpu.md", None),
    ("Quantization × pruning: measured speed, memory, size (CPU)", "speed_cpu.md", None),
    ("Quantization × pruning: measured speed, memory, size (GPU, H100, bf16)", "speed_cuda.md", None),
    ("Dashboard: responsiveness, Tour, adaptive default, sweep and Measure, alone and beside CPU burners",
     "dashboard.md", "python benchmarks/dashboard.py --thorough; python benchmarks/dashboard.py --only "
     "tour,adaptive,sweep,measure --burners 2"),
    ("Refit-aware selection: OBS on entropy-weighted Grams vs entropy / cross-entropy + refit, SmolLM2-135M",
     "obs_smollm2-135m.md", None),
    ("Whole-MLP reconstruction vs MLP-only distillation at equal minutes, SmolLM2-135M", "region_smollm2-135m.md",
     None),
    ("Recovery: one-shot vs KD (full / MLP / LoRA) at equal wall-clock budgets", "recovery.md", None),
    ("Heal without a GPU: recipes in CPU minutes, SmolLM2-135M, wiki", "heal_smollm2-135m_wiki.md", None),
    ("Heal without a GPU: SmolLM2-135M, news", "heal_smollm2-135m_news.md", None),
    ("Heal without a GPU: Gemma-3-270M, wiki", "heal_gemma3-270m_wiki.md", None),
    ("DDP vs one-shot at equal wall-clock budgets", "ddp.md", None),
    ("Prune → quantize → distil: the six orders", "pipeline.md", None),
    ("Prune → quantize → distil in Q4_0, measured in llama.cpp", "pipeline_gguf-q4_0.md",
     "flock /tmp/heavy.lock python benchmarks/pipeline.py --quant gguf-q4_0 --round-to 32 --compensate lsq "
     "--params full --lr 3e-4 --steps 12 --eval-seq-len 256 --decode-tokens 64 --speed-repeats 9"),
    ("Prune → quantize → distil in Q8_0, measured in llama.cpp", "pipeline_gguf-q8_0.md",
     "flock /tmp/heavy.lock python benchmarks/pipeline.py --quant gguf-q8_0 --round-to 32 --compensate lsq "
     "--params full --lr 3e-4 --steps 12 --eval-seq-len 256 --decode-tokens 64 --speed-repeats 9 "
     "--orders pqd,pdq,pq,p"),
    ("INT8 backends on this CPU", "int8_backends_cpu.md", "python benchmarks/int8_backends.py"),
    ("Vision: AMP on DINOv2-small", "vision.md", None),
    ("Scale on the CPU: 2-process scoring, checkpointing, GGUF export", "scale_cpu.md", "python benchmarks/scale.py"),
    ("Pruned where it runs: dense vs pruned in llama.cpp, same GGUF format", "llamacpp.md",
     "flock /tmp/heavy.lock python benchmarks/llamacpp.py"),
    ("GGUF file sizes: what pruning shrinks and what it cannot (tokenizer, header, F32 norms)", "llamacpp_sizes.md",
     "python benchmarks/llamacpp.py --sizes-only --formats f16,q8_0,q4_0"),
    ("Rank stability over calibration draws", "stability.md", None),
]


PLOTS = {"recovery.md": ("recovery.png", "KL to dense vs training minutes"),
         "heal_smollm2-135m_wiki.md": ("heal_smollm2-135m_wiki.png", "KL to dense vs CPU minutes from dense to saved"),
         "heal_smollm2-135m_news.md": ("heal_smollm2-135m_news.png", "KL to dense vs CPU minutes, news text"),
         "heal_gemma3-270m_wiki.md": ("heal_gemma3-270m_wiki.png", "KL to dense vs CPU minutes, Gemma-3-270M"),
         "pipeline.md": ("pipeline.png", "The six orders: speed-up vs KL to dense")}


def section(title: str, filename: str, command: str | None) -> str:
    path = RESULTS / filename
    if not path.exists():
        return f"## {title}\n\nNot measured yet (`benchmarks/results/{filename}` is missing).\n"
    body = path.read_text().strip()
    body = re.sub(r"^##? .*\n+", "", body)  # the file's own heading; ours replaces it
    body = re.sub(r"^#{2,4} ", "### ", body, flags=re.M)  # its sub-headings sit one level under ours
    if "### All metrics" in body:  # the page keeps the KL summary; the full table stays in the file
        head, _, tail = body.partition("### All metrics")
        verdict = tail[tail.find("Best per ratio"):] if "Best per ratio" in tail else ""
        body = (head.rstrip() + f"\n\nPerplexity and top-1 agreement for every row: "
                f"[`benchmarks/results/{filename}`]({LINK}/{filename}).\n\n" + verdict.strip())
    lines = [f"## {title}", ""]
    if command:
        lines += [f"`{command}`", ""]
    if filename in PLOTS and (RESULTS / PLOTS[filename][0]).exists():
        image, alt = PLOTS[filename]
        body += f"\n\n![{alt}]({LINK}/{image})"
    return "\n".join(lines) + "\n" + body + "\n"


def main() -> None:
    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"docs/benchmarks.md needs the markers {START} and {END}.")
    tables = "\n".join(section(*s) for s in SECTIONS)
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    write_text(PAGE, f"{before}{START}\n{tables}{END}{after}")
    print(f"docs/benchmarks.md: {len(SECTIONS)} benchmark sections written")


if __name__ == "__main__":
    main()
