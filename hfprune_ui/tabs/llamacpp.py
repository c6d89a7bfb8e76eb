"""The llama.cpp panel of the Quantize & measure tab: the original and the picked variants written as GGUF
of one type and measured in llama.cpp itself (prompt / generation tokens/s beside the FLOP ideal,
perplexity and KL from llama.cpp's logits), through ``Services.llamacpp_bench``."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.export.gguf import GGUFOptions
from core.measure.llamacpp import LlamaCppOptions

from ..context import PLAIN, model_events, stop_on_click
from ..guard import session_id, user_errors
from ..services import Services
from ..status import count
from .side_by_side import chosen_variants

COLUMNS = ["variant", "GGUF tensor types", "file MB", "params", "prompt tok/s (median, quartiles)",
           "generation tok/s (median, quartiles)", "prompt speed-up", "generation speed-up", "FLOP ideal",
           "perplexity", "KL to original"]
ABOUT = ("The original and each picked variant are written as GGUF files of the chosen type and run in "
         "llama.cpp itself (the runtime of Ollama and LM Studio): every file loaded at once and the repeats "
         "interleaved, so a busy moment of the machine hits them all alike. Speed-ups are over the original in "
         "the same type, beside the FLOP ideal; perplexity and KL come from llama.cpp's own logits on the "
         "held-out windows. A variant's widths must fill the type's blocks (prune with Round widths to 32, or 256 "
         "for the K-quants).")


def _interval(median: float, quartiles: list[float]) -> str:
    return f"{median:.1f} ({quartiles[0]:.1f}–{quartiles[1]:.1f})"


def _speedup(value: dict | None) -> str:
    if not value:
        return "—"
    return f"{value['median']:.2f}× ({value['low']:.2f}–{value['high']:.2f})"


def llamacpp_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per model (the engine's rows from ``measure_llamacpp``), as the panel shows it."""
    out = []
    for row in rows:
        out.append({"variant": row["model"],
                    "GGUF tensor types": ", ".join(f"{k} × {v}" for k, v in row["tensor_types"].items()),
                    "file MB": round(row["file_bytes"] / 1e6, 1), "params": count(row["params"]),
                    "prompt tok/s (median, quartiles)": _interval(row["prompt_tokens_per_s"],
                                                                  row["prompt_tokens_per_s_q1_q3"]),
                    "generation tok/s (median, quartiles)": _interval(row["gen_tokens_per_s"],
                                                                      row["gen_tokens_per_s_q1_q3"]),
                    "prompt speed-up": _speedup(row.get("prompt_speedup")),
                    "generation speed-up": _speedup(row.get("gen_speedup")),
                    "FLOP ideal": f"{row['prompt_ideal']:.2f}×" if row.get("prompt_ideal") else "—",
                    "perplexity": round(row["perplexity"], 2) if "perplexity" in row else "—",
                    "KL to original": round(row["kl_to_reference"], 4) if "kl_to_reference" in row else "—"})
    return pd.DataFrame(out, columns=COLUMNS)


def make_llamacpp_bench(services: Services):
    @user_errors
    def llamacpp_bench(names: list | None, gguf_type: str, threads: float, prompt: float, gen: float, repeats: float,
                       windows: float, request: gr.Request = None, progress=PLAIN):
        """Measure the original and the picked variants in llama.cpp (one table, when all are done)."""
        session = services.sessions.get(session_id(request))
        options = LlamaCppOptions(threads=int(threads), prompt_tokens=int(prompt), gen_tokens=int(gen),
                                  repeats=int(repeats), windows=int(windows), text=session.source)
        job = session.new_job()
        progress(0.0, desc=f"writing GGUF {gguf_type.upper()} files")
        rows = services.llamacpp_bench(session, chosen_variants(session, names), gguf_type, options, stop=job.is_set,
                                       on_progress=lambda done, total: progress(
                                           done / total, desc=f"llama.cpp timing {done}/{total}"))
        note = (f"Measured {len(rows)} models as GGUF {gguf_type.upper()} in llama.cpp with {options.threads} "
                f"threads: {options.repeats} interleaved repeats of a {options.prompt_tokens}-token prompt and "
                f"{options.gen_tokens} generated tokens; quality on {options.windows} × {options.seq_len} held-out "
                "tokens.")
        return llamacpp_frame(rows), note
    return llamacpp_bench


def make_availability(services: Services):
    def availability() -> str:
        """The install sentence where llama-cpp-python is missing, else what the panel does."""
        missing = services.llamacpp_missing()
        return f"**{missing}**" if missing else ABOUT
    return availability


def build_panel(services: Services, variants: gr.components.Component) -> gr.Accordion:
    """The accordion; ``variants`` is the tab's picker of variants to evaluate."""
    with gr.Accordion("llama.cpp (the variants as GGUF, measured in llama.cpp itself)", open=False,
                      elem_id="llamacpp-accordion") as panel:
        about = gr.Markdown(make_availability(services)(), elem_id="llamacpp-about")
        with gr.Row(equal_height=True):
            gguf_type = gr.Dropdown(label="GGUF type", elem_id="llamacpp-type",
                                    **{**GGUFOptions.ui("type"), "value": "q8_0"})
            threads = gr.Slider(label="Threads", **LlamaCppOptions.ui("threads"))
            prompt = gr.Slider(label="Prompt tokens", **LlamaCppOptions.ui("prompt_tokens"))
            gen = gr.Slider(label="Generated tokens", **LlamaCppOptions.ui("gen_tokens"))
            repeats = gr.Slider(label="Repeats", **LlamaCppOptions.ui("repeats"))
            windows = gr.Slider(label="Quality windows", **LlamaCppOptions.ui("windows"))
        with gr.Row(equal_height=True):
            button = gr.Button("Measure in llama.cpp", variant="primary", elem_id="llamacpp-button")
            stop = gr.Button("Stop", variant="stop", min_width=90)
        status = gr.Markdown("", elem_id="llamacpp-note")
        table = gr.Dataframe(label="llama.cpp on this machine (speed-ups: median× (quartile interval), same GGUF type)",
                             headers=COLUMNS, interactive=False, elem_id="llamacpp-table")
    event = button.click(make_llamacpp_bench(services), [variants, gguf_type, threads, prompt, gen, repeats, windows],
                         [table, status], api_name="llamacpp_bench", show_progress_on=table, **model_events())
    stop_on_click(services, stop, status, [event], what="llama.cpp measurement")
    panel.expand(make_availability(services), None, about, api_visibility="private")
    return panel
