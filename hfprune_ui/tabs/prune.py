"""Tab 4 — Prune: preview widths / parameters / FLOPs for a ratio, prune, name, see the price at a
glance, keep or drop variants, sweep criteria × ratios, export."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core.errors import HFPruneError, SelectionError, Stopped
from core.export.gguf import GGUF_BLOCK, GGUFOptions, gguf_width_note
from core.export.hf import EXPORT_MODES, default_export_mode
from core.importance.criteria import get_criterion
from core.measure.timing import scoring_seconds, sweep_seconds
from core.models.counts import prune_preview
from core.prune.allocate import ADAPTIVE_KNOBS, ADAPTIVE_PRESETS, AllocationOptions
from core.prune.compensate import CompensationOptions
from core.studies.stability import SWEEP_DRAWS_MAX, check_sweep_draws
from core.studies.sweep import SWEEP_ALLOCATIONS, parse_ratios

from .. import figures, texts
from ..context import PLAIN, TRACK, Ctx, model_events, stop_on_click, with_criterion_knobs
from ..guard import session_id, user_errors
from ..progress import JobProgress, duration
from ..services import BASELINE, SEQUENTIAL, Services, allocations, criteria, recipe_advice
from ..state import MAX_VARIANTS_PER_SESSION, Session
from ..status import count, distinct, number, readable

PREVIEW_SEQ_LEN = 128
OLDEST = "the oldest"
# The refit is on by default, as on the command line and in Python (CompensationOptions' default, 128 windows).
COMPENSATE_DEFAULT = CompensationOptions().method == "lsq"
KNOBS = ADAPTIVE_KNOBS
VARIANT_COLUMNS = ["name", "criterion", "ratio", "allocation", "compensation", "quantized", "MLP widths",
                   "KL to original", "run"]
SWEEP_COLUMNS = ["criterion", "ratio", "allocation", "perplexity", "kl_to_dense", "top1_agreement", "params"]


def adaptive_knobs(halvings: float, heldout_samples: float, heldout_seq_len: float, fidelity: str,
                   refit_probes: bool = AllocationOptions.refit_probes) -> dict:
    """Form values → the adaptive search's knobs (validated by the engine's AllocationOptions)."""
    knobs = {"halvings": int(halvings), "heldout_samples": int(heldout_samples),
             "heldout_seq_len": int(heldout_seq_len), "fidelity": fidelity, "refit_probes": bool(refit_probes)}
    AllocationOptions(**knobs)  # a bad value is one clear sentence before anything runs
    return knobs


def variant_rows(session: Session) -> pd.DataFrame:
    """The variants this session holds, one row each (what tells three 'entropy · 0.3' apart)."""
    rows = []
    for v in session.variants.values():
        compensation = (v.meta.get("compensation") or {}).get("method", "none")
        quality = v.metrics or {}
        rows.append({"name": v.name, "criterion": v.meta.get("criterion") or "—", "ratio": v.meta.get("ratio"),
                     "allocation": v.meta.get("allocation") or "—", "compensation": compensation,
                     "quantized": v.meta.get("quantization") or "—",
                     "MLP widths": f"{min(v.widths)}–{max(v.widths)}" if v.widths else "—",
                     "KL to original": quality.get("kl", quality.get("kl_to_reference")), "run": v.run_id or ""})
    kls = distinct([r["KL to original"] for r in rows])  # variants that differ never read the same
    for row, kl in zip(rows, kls, strict=True):
        row["KL to original"] = "" if kl is None else kl
    return pd.DataFrame(rows, columns=VARIANT_COLUMNS)


def variant_controls(session: Session):
    """(table, drop picker, replace picker, header) for the 'Variants held' panel."""
    names = list(session.variants)
    nxt = session.next_to_drop()
    header = (f"**{len(names)} of {MAX_VARIANTS_PER_SESSION} variants held.** "
              + (f"The session is full: the next prune replaces **{nxt}**." if nxt else
                 "A full session replaces the variant chosen below (default: the oldest)."))
    replace = session.replace if session.replace in names else OLDEST
    return (variant_rows(session), gr.update(choices=names, value=None),
            gr.update(choices=[OLDEST, *names], value=replace), header)


def make_preview(services: Services):
    @user_errors
    def preview(criterion: str, ratio: float, allocation: str, round_to: str | int, model: str,
                request: gr.Request = None):
        """Kept widths and params/FLOPs before → after, without pruning anything."""
        session = services.sessions.get(session_id(request))
        spec = (model or "").strip()
        if not services.models.cached(spec):
            return ("Load the model (Model & data tab) or press Score to see a preview.",
                    figures.empty("No model loaded"))
        loaded = services.model(spec)
        ready = criterion in session.scores and session.model_spec == spec
        scores = session.scores[criterion].scores if ready else None
        if allocation == "global" and scores is None:
            return ((f"The **global** allocation ranks neurons by their '{criterion}' scores across layers: score the "
                     "model with it first (Importance tab), or press Prune, which scores it."),
                    figures.empty("Global widths need scores"))
        widths = services.plan(loaded, ratio, allocation, int(round_to), scores)
        note = ""
        if widths is None:  # adaptive: the search runs on Prune; preview the uniform widths meanwhile
            widths = services.plan(loaded, ratio, "uniform", int(round_to), None)
            note = ("**Adaptive** widths come from a search on held-out calibration text that runs when you press "
                    "Prune (its time estimate is under *Adaptive search settings*); the preview shows the uniform "
                    "widths for the same ratio.  \n")
        p = prune_preview(loaded.model, widths, PREVIEW_SEQ_LEN)
        text = note + (f"Parameters **{count(p['params_before'], 2)} → {count(p['params_after'], 2)}** "
                       f"(−{100 * (1 - p['params_after'] / p['params_before']):.1f} %); forward FLOPs per token at "
                       f"{PREVIEW_SEQ_LEN} tokens **{count(p['flops_before'])} → {count(p['flops_after'])}** "
                       f"(−{100 * (1 - p['flops_after'] / p['flops_before']):.1f} %); MLP width "
                       f"{min(widths)}–{max(widths)} of {max(p['widths_before'])}.")
        what = "uniform widths shown until Prune runs the search" if note else f"{allocation} allocation"
        return text, figures.widths(p["widths_before"], widths, f"Preview: MLP width per layer at ratio {ratio:.2f}",
                                    what)
    return preview


def kept_widths_figure(variant):
    """The widths variant ``variant`` really kept per layer (its allocation's, adaptive included),
    against the original widths."""
    meta = variant.meta or {}
    full = meta.get("original_intermediate_sizes") or variant.widths
    how = [f"{meta['criterion']} scores" if meta.get("criterion") else "",
           f"{meta['allocation']} allocation" if meta.get("allocation") else "",
           f"widths {min(variant.widths)}–{max(variant.widths)} of {max(full)}"]
    return figures.widths(full, variant.widths, f"Kept MLP width per layer: {variant.name}",
                          ", ".join(h for h in how if h))


def make_variant_widths(services: Services):
    def variant_widths(name: str | None, request: gr.Request = None):
        """Picking a held variant shows the widths it kept; anything else leaves the plot alone."""
        variant = services.sessions.get(session_id(request)).variants.get(name or "")
        return gr.update() if variant is None or not variant.widths else kept_widths_figure(variant)
    return variant_widths


def adaptive_estimate(services: Services, model: str, halvings: float, heldout_samples: float,
                      heldout_seq_len: float, allocation: str = "adaptive") -> str:
    """The honest time estimate shown before an adaptive search starts."""
    spec = (model or "").strip()
    if not services.models.cached(spec):
        return "Time estimate: load the model first (it is measured on this machine)."
    seconds = services.adaptive_seconds(spec, int(halvings), int(heldout_samples), int(heldout_seq_len),
                                        sequential=allocation == SEQUENTIAL)
    return (f"Estimated time for the adaptive search on this machine: **about {duration(seconds)}** "
            f"({int(heldout_samples)} × {int(heldout_seq_len)} held-out tokens, {int(halvings)} halvings per layer"
            f"{', sequential' if allocation == SEQUENTIAL else ''}).")


def make_estimate(services: Services):
    def estimate(allocation: str, model: str, halvings: float, heldout_samples: float, heldout_seq_len: float):
        return adaptive_estimate(services, model, halvings, heldout_samples, heldout_seq_len, allocation)
    return estimate


def make_preset(services: Services):
    def preset(choice: str, allocation: str, model: str):
        """Fill the adaptive knobs with the quick or thorough preset, and re-estimate."""
        knobs = ADAPTIVE_PRESETS.get(choice, ADAPTIVE_PRESETS["quick"])
        return (*(gr.update(value=knobs[k]) for k in KNOBS),
                adaptive_estimate(services, model, knobs["halvings"], knobs["heldout_samples"],
                                  knobs["heldout_seq_len"], allocation))
    return preset


def quality_text(quality: dict) -> str:
    if not quality:
        return "  \n(The held-out text is too short for a quality check; see the Model & data tab.)"
    return (f"  \nQuality at a glance ({quality['windows']} × {quality['seq_len']} held-out tokens): perplexity "
            f"**{quality['original_perplexity']:.1f} → {quality['perplexity']:.1f}**, KL to the original "
            f"**{quality['kl']:.3f}** nats/token, top-1 agreement {100 * quality['top1']:.0f} %. "
            "The Compare tab shows what that means for the model's next-token menus.")


def make_prune(services: Services):
    @user_errors
    @with_criterion_knobs
    def prune(criterion: str, ratio: float, allocation: str, round_to: str | int, compensate: bool,
              compensate_windows: float, name: str, model: str, source: str,
              upload: str | None, samples: float, seq_len: float, seed: float, criterion_knobs: dict,
              halvings: float = 4, heldout_samples: float = 2, heldout_seq_len: float = 64,
              fidelity: str = "kl", region: bool = False, region_windows: float = 32, region_steps: float = 0,
              region_target: str = "local", refit_probes: bool = AllocationOptions.refit_probes,
              request: gr.Request = None, progress=TRACK):
        """Score if needed (cached), prune into a new variant, store the run, measure it at a glance."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        knobs = adaptive_knobs(halvings, heldout_samples, heldout_seq_len, fidelity, refit_probes)
        data = services.data_spec(source, upload, samples, seq_len, seed)
        spec = (model or "").strip()
        windows = int(compensate_windows) if compensate else 0
        rebuild = ({"samples": int(region_windows), "steps": int(region_steps), "target": region_target}
                   if region else None)  # whole-MLP reconstruction after the refit
        tracker = JobProgress(progress, "Prune", stages=1, unit="step")
        tracker.stage(0, f"loading {spec}")
        services.model(spec)
        # each part weighs what it should cost on this machine now, so the bar moves as evenly as the work
        seconds = services.prune_seconds(session, spec, data, criterion, allocation, adaptive=knobs,
                                         params=criterion_knobs.get(criterion), compensate_windows=windows,
                                         region=rebuild)
        tracker.replan(list(seconds.values()), estimate_s=sum(seconds.values()))
        probing = allocation in ("adaptive", SEQUENTIAL) and windows > 0 and knobs["refit_probes"]
        labels = {"widths": ("refit statistics, then the adaptive search probing with the refit" if probing else
                             "adaptive search" if allocation in ("adaptive", SEQUENTIAL) else "pruning"),
                  "refit": "least-squares refit" + (" and whole-MLP reconstruction" if rebuild else "")}
        phases = list(seconds)
        tracker.stage(0, f"scores for {criterion}")
        services.score(session, spec, data, criterion, stop=job.is_set,
                       params=criterion_knobs.get(criterion))
        variant, evicted = services.prune(session, criterion, ratio, allocation, int(round_to), name, stop=job.is_set,
                                          compensate_windows=windows, adaptive=knobs, region=rebuild,
                                          on_phase=lambda phase: tracker.stage(phases.index(phase), labels[phase]))
        tracker.stage(phases.index("quality"), "quality at a glance")
        quality = services.quick_quality(session, variant.name, stop=job.is_set)
        if quality:
            variant.metrics = {**(variant.metrics or {}), "kl": quality["kl"], "quick": quality}
        note = f" '{evicted}' was dropped to make room (its run stays on disk)." if evicted else ""
        refit = (" Every down_proj was refitted by least squares on "
                 f"{variant.meta['compensation']['samples']} calibration windows."
                 if variant.meta.get("compensation", {}).get("method") in ("lsq", "region") else "")
        if "region" in variant.meta:
            done = variant.meta["region"]
            refit += (f" Then every MLP was fitted to the original's, layer by layer, on {done['tokens']} tokens "
                      f"(held-out error {done['mean_error_start']:.3f} → {done['mean_error_end']:.3f}).")
        params = sum(p.numel() for p in variant.model.parameters())
        status = (f"Pruned **{variant.name}**: MLP widths {min(variant.widths)}–{max(variant.widths)}, "
                  f"{count(params)} parameters, stored as run `{variant.run_id}`.{refit}{note}" + quality_text(quality))
        trace = variant.meta.get("adaptive", {}).get("trace")
        figure = (figures.adaptive_trace(trace, trace_layers(len(trace))) if trace else
                  figures.empty("Choose the adaptive allocation to see its per-layer search here."))
        return (status, gr.update(choices=list(session.variants), value=variant.name), figure,
                *variant_controls(session), kept_widths_figure(variant))
    return prune


def trace_layers(count: int) -> list[int]:
    """A readable subset of layers for the trace plot: about six, evenly spread, first and last included."""
    step = max(1, round((count - 1) / 5))
    return sorted({*range(0, count, step), count - 1})


def make_sweep(services: Services):
    @user_errors
    def sweep(names: list | None, ratios: str, allocation: str, round_to: str | int, windows: float,
              seq_len: float, metric: str, compensate_windows: float = 64, baseline: bool = True,
              draws: float = 1, request: gr.Request = None, progress=TRACK):
        """Prune each scored criterion at each ratio (in memory) and measure fidelity; stream the rows.
        ``draws`` K ≥ 2: every row is the mean ± std over K disjoint calibration draws of the scores.
        A Stop or a failure keeps the rows already measured, with a note saying so."""
        session = services.sessions.get(session_id(request))
        job = session.new_job()
        draws = check_sweep_draws(draws, allocation)
        unscored = [n for n in (names or []) if n not in session.scores]
        if unscored:
            raise HFPruneError(f"Not scored yet: {', '.join(unscored)}. Score them on the Importance tab, or untick "
                               "them.")
        chosen = list(names or []) or list(session.scores)
        if not chosen:
            raise HFPruneError("Score at least one criterion first (Importance tab).")
        ratio_list = parse_ratios(ratios)
        total = (len(chosen) + bool(baseline)) * len(ratio_list)
        passes = len(chosen) * (draws - 1)  # scoring passes for the extra draws (fewer when cached)
        tracker = JobProgress(progress, "Sweep", stages=passes + total, unit="step")
        scored_passes: list[str] = []

        def on_draw(name: str, k: int, count: int) -> None:
            tracker.stage(len(scored_passes), f"scoring {name}, calibration draw {k + 1} of {count}")
            scored_passes.append(name)

        over = (f"; each row is the mean ± std over {draws} disjoint calibration draws of the scores "
                f"({session.calibration.short()} each)" if draws > 1 else "")
        rows: list[dict] = []
        try:
            for row in services.sweep(session, chosen, ratio_list, allocation, int(round_to), int(windows),
                                      int(seq_len), stop=job.is_set, compensate_windows=int(compensate_windows),
                                      baseline=bool(baseline), draws=draws, on_draw=on_draw):
                rows.append(row)
                tracker.stage(len(scored_passes) + len(rows), f"{row['criterion']} @ {row['ratio']:.2f}")
                yield (sweep_table(rows), figures.sweep_lines(rows, metric),
                       f"{len(rows)} of {total} rows measured on {int(windows)} × {int(seq_len)} held-out tokens"
                       f"{over}.")
        except (Stopped, HFPruneError) as exc:
            if not rows:
                raise
            how = "Stopped" if isinstance(exc, Stopped) else f"Failed ({exc})"
            gr.Info(f"The sweep: {how.lower()} after {len(rows)} rows; the rows already measured are kept.")
            yield (sweep_table(rows), figures.sweep_lines(rows, metric),
                   f"**{how}** after {len(rows)} of {total} rows: a partial sweep, the rows above are kept.")
    return sweep


def make_sweep_estimate(services: Services):
    def estimate(names: list | None, ratios: str, allocation: str, windows: float, seq_len: float,
                 compensate_windows: float, baseline: bool, draws: float = 1, request: gr.Request = None) -> str:
        """About how long the sweep takes on this machine, before it starts (with K calibration draws:
        K evaluations per row plus K − 1 scoring passes per criterion, cached ones counted too)."""
        session = services.sessions.get(session_id(request))
        spec = session.model_spec
        if not spec or not services.models.cached(spec):
            return ""
        try:
            count = len(parse_ratios(ratios))
            k = check_sweep_draws(draws, allocation)
        except HFPruneError:
            return ""  # the Run button says what is wrong with the ratios or K
        chosen = list(names or session.scores)
        rows = (len(chosen) + bool(baseline)) * count
        seq = session.calibration.seq_len
        compensation = int(compensate_windows) * seq if allocation.endswith("+lsq") else 0
        per_token = services.seconds_per_token(spec)
        seconds = sweep_seconds(per_token, rows * k, int(windows) * int(seq_len), compensation)
        if k > 1:  # no data chosen yet means no scores, so nothing is added
            tokens = session.calibration.samples * session.calibration.seq_len
            seconds += (k - 1) * sum(scoring_seconds(per_token, tokens, get_criterion(n).cost) for n in chosen
                                     if n in session.scores)
        over = f", each over {k} calibration draws" if k > 1 else ""
        return f"Estimated time: **about {duration(seconds)}** for {rows} rows{over} on this machine."
    return estimate


def sweep_table(rows: list[dict]) -> pd.DataFrame:
    """Rows → a criteria × ratio table (KL to dense; perplexity and top-1 in the other columns). Rows
    over K calibration draws (core.stability.draw_summary) show KL as mean ± std and per draw, and
    the means of perplexity and top-1."""
    if rows and "kl_std" in rows[0]:
        return draws_table(rows)
    frame = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    frame["ratio"] = frame["ratio"].map(lambda r: f"{r:.2f}")
    frame["params"] = frame["params"].map(count)
    return readable(frame)


def draws_table(rows: list[dict]) -> pd.DataFrame:
    """Rows over K calibration draws → criterion, ratio, allocation, draws, KL mean ± std, KL per draw
    (draw order; their spread is the min–max), mean perplexity, mean top-1, params."""
    means = [r["kl_mean"] for r in rows]
    out = [{"criterion": r["criterion"], "ratio": f"{r['ratio']:.2f}", "allocation": r["allocation"],
            "draws": r["draws"], "KL to dense (mean ± std)": f"{number(r['kl_mean'], means)} ± {number(r['kl_std'])}",
            "KL per draw": ", ".join(number(v, r["kl_draws"]) for v in r["kl_draws"]),
            "perplexity (mean)": r["perplexity"], "top-1 (mean)": r["top1_agreement"],
            "params": count(r["params"])} for r in rows]
    return readable(pd.DataFrame(out))


def make_scored(services: Services):
    def scored(request: gr.Request = None):
        """Tick the criteria this session has scored."""
        return gr.update(value=list(services.sessions.get(session_id(request)).scores))
    return scored


def make_variants_panel(services: Services):
    def panel(request: gr.Request = None):
        return variant_controls(services.sessions.get(session_id(request)))
    return panel


def make_drop(services: Services):
    @user_errors
    def drop(name: str | None, request: gr.Request = None):
        session = services.sessions.get(session_id(request))
        if not name or name not in session.variants:
            raise SelectionError("Pick a variant of this session to drop.")
        session.drop_variant(name)
        return variant_controls(session)
    return drop


def make_replace(services: Services):
    def replace(choice: str | None, request: gr.Request = None):
        """Remember which variant a full session drops next."""
        session = services.sessions.get(session_id(request))
        session.replace = choice if choice in session.variants else None
        return variant_controls(session)[3]
    return replace


def make_default_format(services: Services):
    def default_format(name: str | None, request: gr.Request = None):
        """The format that works for the picked variant, and why (one line)."""
        session = services.sessions.get(session_id(request))
        variant = session.variants.get(name or "")
        if variant is None:
            return gr.update(), ""
        mode, why = default_export_mode(variant.widths, heads_pruned="heads" in variant.meta)
        return mode, f"Default format for **{name}**: {why}"
    return default_format


def make_format_note(services: Services):
    def format_note(name: str | None, mode: str, gguf_type: str = GGUFOptions.type, request: gr.Request = None):
        """Picking GGUF (or its type): the block the type needs, whether the variant's widths fit it, the
        achieved ratio (the engine's sentence), and the type choice shown; other formats hide the type."""
        session = services.sessions.get(session_id(request))
        variant = session.variants.get(name or "")
        if mode != "gguf" or variant is None:
            return gr.update(), gr.update(visible=mode == "gguf")
        full = variant.meta.get("original_intermediate_sizes")
        kind = gguf_type or GGUFOptions.type
        return f"**{name}** as GGUF: {gguf_width_note(kind, variant.widths, full)}", gr.update(visible=True)
    return format_note


def make_export_zip(services: Services):
    @user_errors
    def export_zip(name: str, mode: str, gguf_type: str = GGUFOptions.type, request: gr.Request = None,
                   progress=PLAIN):
        session = services.sessions.get(session_id(request))
        if not name:
            raise SelectionError("Pick a variant to export.")
        progress(0.1, desc=f"writing GGUF {gguf_type.upper()}" if mode == "gguf" else "writing safetensors")
        archive = services.export_zip(session, name, mode, gguf_type or GGUFOptions.type)
        return str(archive), f"Packed **{name}** as `{archive.name}` ({archive.stat().st_size / 2**20:.0f} MiB)."
    return export_zip


def make_export_save(services: Services):
    @user_errors
    def export_save(name: str, mode: str, folder: str, gguf_type: str = GGUFOptions.type,
                    request: gr.Request = None) -> str:
        session = services.sessions.get(session_id(request))
        if not name:
            raise SelectionError("Pick a variant to export.")
        if not (folder or "").strip():
            raise SelectionError("Type the folder to save into (it must not exist yet, or be empty).")
        target = services.save_to_folder(session, name, mode, folder.strip(), gguf_type or GGUFOptions.type)
        if mode == "gguf":
            return f"Saved **{name}** to `{target}`; run its .gguf file with llama.cpp, Ollama or LM Studio."
        how = ("`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`" if mode == "hf-remote-code"
               else "`AutoModelForCausalLM.from_pretrained(folder)`")
        return f"Saved **{name}** to `{target}`; reload it with {how}."
    return export_save


def build(ctx: Ctx) -> None:
    services = ctx.services
    names = criteria()
    quick = ADAPTIVE_PRESETS["quick"]
    with gr.Tab("Prune", id="prune") as tab:
        gr.Markdown(texts.PRUNE, elem_classes="teach")
        with gr.Row():
            criterion = gr.Dropdown(names, value="entropy" if "entropy" in names else names[0], label="Criterion")
            ratio = gr.Slider(0.0, 0.95, value=0.2, step=0.01, label="Ratio of MLP neurons removed", elem_id="ratio")
            allocation = gr.Dropdown(allocations(), value=allocations()[0][1], label="Allocation",
                                     info="how the cut is spread over layers (see the glossary)", elem_id="allocation")
            round_to = gr.Dropdown(["1", "8", str(GGUF_BLOCK["q8_0"]), "64", "128", str(GGUF_BLOCK["q4_k_m"])],
                                   value="1",
                                   label="Round widths to a multiple of",
                                   info=f"{GGUF_BLOCK['q8_0']}: the block of GGUF Q8_0 / Q5_0 / Q4_0; "
                                        f"{GGUF_BLOCK['q4_k_m']}: of the K-quants (Q4_K_M …)")
        with gr.Accordion("Adaptive search settings (used by the adaptive allocations)", open=False,
                          elem_id="adaptive-settings"):
            with gr.Row():
                preset = gr.Radio(list(ADAPTIVE_PRESETS), value="quick", label="Preset",
                                  info="quick: the dashboard default; thorough: the command line's default",
                                  elem_id="adaptive-preset")
                fidelity = gr.Dropdown(label="Fidelity measured", **{**AllocationOptions.ui("fidelity"),
                                                                     "value": quick["fidelity"]})
            with gr.Row():
                halvings = gr.Slider(label="Halvings per layer", **{**AllocationOptions.ui("halvings"),
                                                                    "value": quick["halvings"]})
                heldout_samples = gr.Slider(label="Held-out windows", **{**AllocationOptions.ui("heldout_samples"),
                                                                         "value": quick["heldout_samples"]})
                heldout_seq_len = gr.Slider(label="Tokens per held-out window",
                                            **{**AllocationOptions.ui("heldout_seq_len"),
                                               "value": quick["heldout_seq_len"]})
            refit_probes = gr.Checkbox(label="Probe each width with the least-squares refit applied (when the "
                                       "refit below is on)", **AllocationOptions.ui("refit_probes"),
                                       elem_id="refit-probes")
            advice = recipe_advice()  # generated from the stored benchmark results, shown before anything is picked
            gr.Markdown(advice["probes"], elem_id="probe-advice")
            estimate = gr.Markdown("", elem_id="adaptive-estimate")
        gr.Markdown(advice["adaptive"], elem_id="adaptive-advice")
        with gr.Row():
            compensate = gr.Checkbox(COMPENSATE_DEFAULT, label="Least-squares compensation (refit down_proj after "
                                     "pruning)", info=texts.COMPENSATION, elem_id="compensate")
            compensate_windows = gr.Slider(label="Compensation windows (× the data tab's tokens per window; "
                                           "forward passes only)", **CompensationOptions.ui("samples"))
        gr.Markdown(advice["refit"], elem_id="refit-advice")
        with gr.Row():
            region = gr.Checkbox(False, label="Whole-MLP reconstruction after the refit", info=texts.REGION,
                                 elem_id="region")
            region_windows = gr.Slider(label="Reconstruction windows", **CompensationOptions.ui("region_samples"))
            region_steps = gr.Slider(label="Adam steps per layer", **CompensationOptions.ui("region_steps"))
            region_target = gr.Dropdown(label="Fit each MLP to", **CompensationOptions.ui("region_target"))
        preview_text = gr.Markdown("", elem_id="prune-preview")
        preview_plot = gr.Plot(label="Kept width per layer", elem_id="widths-plot")
        with gr.Row(equal_height=True):
            name = gr.Textbox("", label="Variant name", scale=3,
                              placeholder="default: e.g. entropy-20%, entropy-20%-global+lsq (taken: -2)")
            prune_button = gr.Button("Prune", variant="primary", elem_id="prune-button", scale=1, min_width=120)
            stop_button = gr.Button("Stop", variant="stop", scale=1, min_width=100, elem_id="prune-stop")
        status = gr.Markdown("", elem_id="prune-status")
        with gr.Accordion("Variants held in this session", open=True, elem_id="variants-held"):
            held_header = gr.Markdown(f"**0 of {MAX_VARIANTS_PER_SESSION} variants held.**")
            held = gr.Dataframe(headers=VARIANT_COLUMNS, interactive=False, elem_id="variants-table")
            with gr.Row(equal_height=True):
                replace = gr.Dropdown([OLDEST], value=OLDEST, label="When the session is full, replace",
                                      elem_id="replace-choice", scale=2)
                drop_pick = gr.Dropdown([], value=None, label="Drop a variant now", scale=2)
                drop_button = gr.Button("Drop", scale=1, min_width=100)
        trace_plot = gr.Plot(label="Adaptive search trace", elem_id="trace-plot")
        with gr.Accordion("Criteria × ratio fidelity sweep (prunes in memory, measures on held-out text)", open=False,
                          elem_id="sweep-accordion"):
            with gr.Row():
                sweep_criteria = gr.CheckboxGroup(names, value=[], label="Criteria (the scored ones are ticked)",
                                                  scale=3)
                sweep_ratios = gr.Textbox("0.2, 0.3, 0.4", label="Ratios", scale=1, elem_id="sweep-ratios")
                sweep_allocation = gr.Dropdown(list(SWEEP_ALLOCATIONS), value="uniform", label="Allocation", scale=1)
            with gr.Row():
                sweep_windows = gr.Slider(1, 32, value=4, step=1, label="Evaluation windows", elem_id="sweep-windows")
                sweep_len = gr.Slider(16, 512, value=64, step=16, label="Tokens per window", elem_id="sweep-len")
                sweep_metric = gr.Dropdown([("KL to dense", "kl_to_dense"), ("perplexity", "perplexity"),
                                            ("top-1 agreement", "top1_agreement")], value="kl_to_dense",
                                           label="Plot")
                sweep_baseline = gr.Checkbox(True, label=f"add a {BASELINE} row",
                                             info="seeded random scores: the floor every criterion must beat")
                sweep_draws = gr.Slider(1, SWEEP_DRAWS_MAX, value=1, step=1,
                                        label="Error bars over K calibration draws (1 = off)",
                                        info="2 or more re-scores each criterion on K disjoint calibration draws "
                                             "(K − 1 extra scoring passes each) and shows KL as mean ± std",
                                        elem_id="sweep-draws")
            with gr.Row(equal_height=True):
                sweep_button = gr.Button("Run sweep", variant="primary", elem_id="sweep-button")
                sweep_stop = gr.Button("Stop sweep", variant="stop", elem_id="sweep-stop")
            sweep_estimate = gr.Markdown("", elem_id="sweep-estimate")
            sweep_note = gr.Markdown("", elem_id="sweep-note")
            sweep_frame = gr.Dataframe(label="Fidelity per criterion and ratio", headers=SWEEP_COLUMNS,
                                       interactive=False, elem_id="sweep-table")
            sweep_plot = gr.Plot(label="Fidelity vs ratio", elem_id="sweep-plot")
        with gr.Accordion("Export", open=False, elem_id="export-accordion"):
            with gr.Row():
                export_variant = gr.Dropdown([], value=None, allow_custom_value=True, label="Variant",
                                             elem_id="export-variant")
                mode = gr.Dropdown(list(EXPORT_MODES), value=EXPORT_MODES[0], label="Format", elem_id="export-format")
                gguf_type = gr.Dropdown(label="GGUF type", visible=False, elem_id="export-gguf-type",
                                        **GGUFOptions.ui("type"))
            export_why = gr.Markdown("", elem_id="export-why")
            with gr.Row(equal_height=True):
                zip_button = gr.Button("Download as .zip")
                folder = gr.Textbox("", label="…or save to this folder on the server")
                save_button = gr.Button("Save to folder")
            export_file = gr.File(label="Exported archive", interactive=False)
            export_status = gr.Markdown("")
    ctx.add(prune_criterion=criterion, prune_ratio=ratio, prune_allocation=allocation, prune_status=status,
            prune_name=name, export_variant=export_variant, held=held, held_header=held_header,
            trace_plot=trace_plot, drop_pick=drop_pick, replace=replace)
    knobs = [halvings, heldout_samples, heldout_seq_len, fidelity]
    preview = make_preview(services)
    preview_inputs = [criterion, ratio, allocation, round_to, ctx["model"]]
    for component in (criterion, allocation, round_to):
        component.input(preview, preview_inputs, [preview_text, preview_plot], api_visibility="private")
    ratio.change(preview, preview_inputs, [preview_text, preview_plot], api_name="prune_preview",
                 show_progress="hidden")
    estimate_inputs = [allocation, ctx["model"], halvings, heldout_samples, heldout_seq_len]
    for component in (allocation, halvings, heldout_samples, heldout_seq_len):
        component.input(make_estimate(services), estimate_inputs, estimate, api_visibility="private")
    preset.input(make_preset(services), [preset, allocation, ctx["model"]], [*knobs, estimate],
                 api_name="adaptive_preset")
    panel_outputs = [held, drop_pick, replace, held_header]
    tab.select(preview, preview_inputs, [preview_text, preview_plot], api_visibility="private")
    tab.select(make_estimate(services), estimate_inputs, estimate, api_visibility="private")
    tab.select(make_scored(services), None, sweep_criteria, api_visibility="private")
    tab.select(make_variants_panel(services), None, panel_outputs, api_visibility="private")
    sweep_estimate_inputs = [sweep_criteria, sweep_ratios, sweep_allocation, sweep_windows, sweep_len,
                             compensate_windows, sweep_baseline, sweep_draws]
    for component in sweep_estimate_inputs:
        component.input(make_sweep_estimate(services), sweep_estimate_inputs, sweep_estimate,
                        api_visibility="private", show_progress="hidden")
    tab.select(make_sweep_estimate(services), sweep_estimate_inputs, sweep_estimate, api_name="sweep_estimate",
               show_progress="hidden")  # public: benchmarks/dashboard.py records the estimate the tab shows
    sweep_event = sweep_button.click(make_sweep(services), [sweep_criteria, sweep_ratios, sweep_allocation, round_to,
                                                            sweep_windows, sweep_len, sweep_metric,
                                                            compensate_windows, sweep_baseline, sweep_draws],
                                     [sweep_frame, sweep_plot, sweep_note], api_name="sweep",
                                     show_progress_on=sweep_frame, **model_events())
    ctx.after(sweep_event)
    stop_on_click(services, sweep_stop, sweep_note, [sweep_event], api_name="sweep_stop", what="sweep")
    prune_event = prune_button.click(make_prune(services), [criterion, ratio, allocation, round_to, compensate,
                                                            compensate_windows, name, *ctx.data_inputs,
                                                            *ctx.criterion_inputs, *knobs, region, region_windows,
                                                            region_steps, region_target, refit_probes],
                                     [status, export_variant, trace_plot, *panel_outputs, preview_plot],
                                     api_name="prune", show_progress_on=status,
                                     **model_events())
    ctx.after(prune_event)
    stop_on_click(services, stop_button, status, [prune_event], what="pruning")
    drop_event = drop_button.click(make_drop(services), drop_pick, panel_outputs, api_name="drop_variant")
    ctx.after(drop_event)
    replace.input(make_replace(services), replace, held_header, api_name="replace_choice").then(
        make_variants_panel(services), None, panel_outputs, api_visibility="private")
    export_variant.change(make_default_format(services), export_variant, [mode, export_why],
                          api_name="export_default")
    export_variant.change(make_variant_widths(services), export_variant, preview_plot, api_visibility="private")
    mode.input(make_format_note(services), [export_variant, mode, gguf_type], [export_why, gguf_type],
               api_name="export_format_note")
    gguf_type.input(make_format_note(services), [export_variant, mode, gguf_type], [export_why, gguf_type],
                    api_visibility="private")
    zip_button.click(make_export_zip(services), [export_variant, mode, gguf_type], [export_file, export_status],
                     api_name="export_zip", show_progress_on=export_status, **model_events())
    save_button.click(make_export_save(services), [export_variant, mode, folder, gguf_type], export_status,
                      api_name="export_save", **model_events())
