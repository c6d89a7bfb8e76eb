"""Tab 5 — Compare (side by side): the original and pruned variants on the same prompt, context and text."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import HFPruneError
from core.measure.outputs import GenerationSettings

from .. import figures, texts
from ..context import PLAIN, TRACK, Ctx, model_events
from ..guard import session_id, user_errors
from ..progress import JobProgress
from ..services import Services
from ..state import Session
from ..status import count, readable

METRIC_COLUMNS = {"variant": "variant", "params": "params", "mlp_params": "MLP params", "perplexity": "perplexity",
                  "kl_to_reference": "KL to original", "top1_agreement": "top-1 agreement",
                  "top10_overlap": "top-10 overlap", "entropy": "prediction entropy (nats)",
                  "entropy_shift": "prediction entropy shift", "tokens": "eval tokens"}


def chosen_variants(session: Session, names: list | None) -> list[str]:
    """The picked variant names (empty = every variant of this session), never 'original'."""
    picked = [n for n in (names or []) if n != "original"]
    return picked or list(session.variants)


def make_refresh(services: Services):
    def refresh(request: gr.Request = None):
        """Offer this session's variants in the pickers."""
        session = services.sessions.get(session_id(request))
        names = list(session.variants)
        return (gr.update(choices=names, value=names),
                gr.update(choices=names, value=names[-1] if names else None))
    return refresh


def make_generate(services: Services):
    @user_errors
    def generate(names: list | None, prompt: str, max_new_tokens: float, temperature: float, top_k: float,
                 top_p: float, seed: float, request: gr.Request = None, progress=PLAIN):
        session = services.sessions.get(session_id(request))
        picked = chosen_variants(session, names)
        settings = GenerationSettings(int(max_new_tokens), float(temperature), int(top_k), float(top_p), int(seed))
        progress(0.1, desc=f"generating with {len(services.models_for(session, picked))} models")
        outputs = services.generate(session, picked, prompt, settings)
        return figures.generations(prompt, outputs)
    return generate


def make_menu(services: Services):
    @user_errors
    def menu(names: list | None, context: str, k: float, request: gr.Request = None):
        session = services.sessions.get(session_id(request))
        result = services.menus(session, chosen_variants(session, names), context, int(k))
        summary = " · ".join(f"**{n}**: top-1 {result.top1[n]!r}, entropy {result.entropy[n]:.2f} nats"
                             for n in result.probs)
        return figures.token_menu(result.tokens, result.probs, result.entropy), summary
    return menu


def make_kl(services: Services):
    @user_errors
    def kl(name: str | None, text: str, request: gr.Request = None):
        session = services.sessions.get(session_id(request))
        if not name:
            raise HFPruneError("Prune a variant first, then pick it here.")
        result = services.token_kl(session, name, text)
        scale = max(result.max, 1e-6)
        summary = (f"**{name}** vs original over {len(result.tokens)} tokens: mean KL **{result.mean:.4f}** nats, "
                   f"max {result.max:.3f} (darkest red). Hover a token for its value.")
        return figures.kl_text(result.tokens, result.kl, scale), summary
    return kl


def make_evaluate(services: Services):
    @user_errors
    def evaluate(names: list | None, windows: float, seq_len: float, request: gr.Request = None,
                 progress=TRACK):
        session = services.sessions.get(session_id(request))
        picked = chosen_variants(session, names)
        JobProgress(progress, f"Evaluate {1 + len(picked)} models on {int(windows)} × {int(seq_len)} held-out tokens")
        rows = services.evaluate_variants(session, picked, int(windows), int(seq_len))
        table = readable(pd.DataFrame(rows)[list(METRIC_COLUMNS)])
        for column in ("params", "mlp_params"):
            table[column] = table[column].map(count)
        table = table.rename(columns=METRIC_COLUMNS)
        plot = figures.params_vs_perplexity([r["variant"] for r in rows], [r["params"] for r in rows],
                                            [r["perplexity"] for r in rows])
        return table, plot
    return evaluate


def build(ctx: Ctx) -> None:
    services = ctx.services
    with gr.Tab("Compare", id="compare") as tab:
        gr.Markdown(texts.COMPARE, elem_classes="teach")
        variants = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                               label="Variants to compare with the original (empty = all)", elem_id="compare-variants")
        with gr.Accordion("Generations (same seed, same settings)", open=True):
            with gr.Row():
                prompt = gr.Textbox(texts.DEFAULT_PROMPT, label="Prompt", scale=3)
                generate_button = gr.Button("Generate", variant="primary", scale=1)
            with gr.Row():
                max_new = gr.Slider(1, 256, value=32, step=1, label="New tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                top_k = gr.Slider(0, 200, value=50, step=1, label="top-k (0 = off)")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
                seed = gr.Number(0, precision=0, label="Seed")
            generations = gr.HTML("", elem_id="generations")
        with gr.Accordion("Next-token menu", open=True):
            with gr.Row():
                context = gr.Textbox(texts.DEFAULT_CONTEXT, label="Context", scale=3)
                k = gr.Slider(1, 30, value=10, step=1, label="top-k per model")
                menu_button = gr.Button("Show menu", variant="primary", elem_id="menu-button")
            menu_plot = gr.Plot(label="Next-token distributions", elem_id="menu-plot")
            menu_text = gr.Markdown("", elem_id="menu-text")
        with gr.Accordion("Per-token KL along a text", open=True):
            with gr.Row():
                kl_variant = gr.Dropdown([], value=None, allow_custom_value=True, label="Variant")
                kl_button = gr.Button("Colour tokens")
            kl_input = gr.Textbox(texts.DEFAULT_KL_TEXT, lines=3, label="Text")
            kl_html = gr.HTML("", elem_id="kl-text")
            kl_text = gr.Markdown("")
        with gr.Accordion("Perplexity and fidelity", open=True):
            with gr.Row():
                windows = gr.Slider(1, 64, value=4, step=1, label="Evaluation windows (held-out text)")
                eval_len = gr.Slider(16, 1024, value=64, step=16, label="Tokens per window")
                eval_button = gr.Button("Evaluate", variant="primary")
            metrics = gr.Dataframe(label="Metrics", headers=list(METRIC_COLUMNS.values()), interactive=False)
            metrics_plot = gr.Plot(label="Parameters vs perplexity")
    ctx.add(compare_variants=variants, menu_context=context, menu_k=k, menu_plot=menu_plot, menu_text=menu_text,
            kl_variant=kl_variant)
    tab.select(make_refresh(services), None, [variants, kl_variant], api_name="compare_refresh")
    generate_button.click(make_generate(services), [variants, prompt, max_new, temperature, top_k, top_p, seed],
                          generations, api_name="generate", **model_events())
    menu_button.click(make_menu(services), [variants, context, k], [menu_plot, menu_text], api_name="menu",
                      show_progress_on=menu_plot, **model_events())
    kl_button.click(make_kl(services), [kl_variant, kl_input], [kl_html, kl_text], api_name="token_kl",
                    show_progress_on=kl_html, **model_events())
    eval_button.click(make_evaluate(services), [variants, windows, eval_len], [metrics, metrics_plot],
                      api_name="evaluate", show_progress_on=metrics, **model_events())
