"""A session's variants (issue: section 4): default names say what differs and a taken name is never
replaced silently; a full session never makes room with the variant the action reads from; the status
line is redrawn after Recover, DDP and Pipeline. On a tiny model (MLP width 64, 2 layers)."""
from __future__ import annotations

import pytest

from core.errors import SelectionError
from hfprune_ui.services import prune_name
from hfprune_ui.state import MAX_VARIANTS_PER_SESSION, Variant
from hfprune_ui.status import status_markdown


def _one_sentence(text: str) -> bool:
    return text.endswith(".") and ". " not in text and "\n" not in text


def _copies(session, source: str, names: list[str]) -> None:
    """Fill the session with stand-ins that share ``source``'s model (no work; they only take room)."""
    held = session.variants[source]
    for name in names:
        session.add_variant(Variant(name, held.base_spec, held.model, list(held.widths), dict(held.meta)))


def test_default_names_say_criterion_ratio_allocation_and_refit():
    assert prune_name("entropy", 0.3, "uniform", False) == "entropy-30%"
    assert prune_name("entropy", 0.3, "global", False) == "entropy-30%-global"
    assert prune_name("entropy", 0.3, "adaptive", True) == "entropy-30%-adaptive+lsq"
    assert prune_name("magnitude", 0.255, "uniform", True) == "magnitude-25.5%+lsq"


def test_two_prunes_with_defaults_keep_both_under_names_that_say_what_differs(tiny_services):
    services, session, _folder = tiny_services
    uniform, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "")
    spread, _ = services.prune(session, "entropy", 0.25, "global", 1, "")
    refit, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "  ", compensate_windows=2)
    again, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "")  # nothing differs: a suffix, no replacing
    assert [uniform.name, spread.name, refit.name, again.name] == \
        ["entropy-25%", "entropy-25%-global", "entropy-25%+lsq", "entropy-25%-2"]
    assert list(session.variants) == ["entropy-25%", "entropy-25%-global", "entropy-25%+lsq", "entropy-25%-2"]
    assert session.variants["entropy-25%"] is uniform and session.take_notices() == []


def test_a_typed_name_already_held_is_refused_in_one_sentence_before_any_work(tiny_services):
    services, session, _folder = tiny_services
    first, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "cut")
    with pytest.raises(SelectionError) as refused:
        services.prune(session, "entropy", 0.5, "global", 1, " cut ")
    assert str(refused.value) == ("This session already holds a variant named 'cut'; type another name, or drop that "
                                  "one first (Prune ▸ Variants held).")
    assert _one_sentence(str(refused.value))
    assert session.variants["cut"] is first and len(services.runs.list("prune")) == 1  # nothing pruned or stored
    with pytest.raises(SelectionError, match="already holds a variant named 'cut'"):
        services.ddp_name(session, "mlp", 0.2, "cut")  # DDP and Recover refuse before their training starts
    session.drop_variant("cut")
    services.prune(session, "entropy", 0.5, "global", 1, "cut")  # free again once dropped
    assert session.variants["cut"] is not first


def test_the_tour_remakes_its_own_variants_with_a_notice(tiny_services):
    services, session, _folder = tiny_services
    services.prune(session, "entropy", 0.3, "uniform", 1, "tour-entropy-30%", replace=True)
    again, _ = services.prune(session, "entropy", 0.3, "uniform", 1, "tour-entropy-30%", replace=True)
    assert list(session.variants) == ["tour-entropy-30%"] and session.variants["tour-entropy-30%"] is again
    [notice] = session.take_notices()
    assert notice.startswith("'tour-entropy-30%' was replaced by the new variant of the same name")


def test_loading_a_run_keeps_its_name_unless_another_variant_has_it(tiny_services):
    services, session, _folder = tiny_services
    old, _ = services.prune(session, "entropy", 0.25, "uniform", 1, "cut")
    session.drop_variant("cut")
    new, _ = services.prune(session, "entropy", 0.5, "uniform", 1, "cut")
    assert services.load_run(session, old.run_id).startswith("Loaded pruned variant 'cut-2'")
    assert session.variants["cut"] is new and session.variants["cut-2"].run_id == old.run_id
    assert services.load_run(session, new.run_id).startswith("Loaded pruned variant 'cut'")  # itself again
    assert list(session.variants) == ["cut-2", "cut"] and session.take_notices() == []


def test_quantizing_at_the_limit_keeps_the_source_and_the_result(tiny_services):
    services, session, _folder = tiny_services
    services.prune(session, "entropy", 0.25, "uniform", 1, "a")
    _copies(session, "a", ["b", "c", "d"][:MAX_VARIANTS_PER_SESSION - 1])
    assert session.next_to_drop() == "a"  # the oldest: what a prune would replace
    quantized, evicted = services.quantize(session, "a", "torchao-int8")
    assert evicted == "b" and quantized.name == "a+torchao-int8"
    assert list(session.variants) == ["a", "c", "d", "a+torchao-int8"]
    assert "'b' was dropped to make room for 'a+torchao-int8'" in session.take_notices()[0]
    # the user chose the source itself to go: refused in one sentence, nothing changes
    session.replace = "a"
    before = list(session.variants)
    with pytest.raises(SelectionError) as refused:
        services.quantize(session, "a", "torchao-int8")
    assert _one_sentence(str(refused.value)) and "'a' is chosen to make room" in str(refused.value)
    with pytest.raises(SelectionError, match="reads from it"):
        services.recover_name(session, "a", "mlp")  # before any training starts
    assert list(session.variants) == before and session.replace == "a"
    session.replace = "c"  # another choice: honoured
    again, evicted = services.quantize(session, "a", "torchao-int8")
    assert evicted == "c" and again.name == "a+torchao-int8-2" and "a" in session.variants


def test_a_full_session_where_only_the_source_could_go_refuses(monkeypatch, tiny_services):
    import hfprune_ui.state as state

    services, session, _folder = tiny_services
    services.prune(session, "entropy", 0.25, "uniform", 1, "only")
    monkeypatch.setattr(state, "MAX_VARIANTS_PER_SESSION", 1)
    with pytest.raises(SelectionError) as refused:
        services.quantize(session, "only", "torchao-int8")
    assert _one_sentence(str(refused.value)) and "drop a variant first" in str(refused.value)
    assert list(session.variants) == ["only"]


def test_the_status_line_counts_variants_after_a_recover_at_the_limit(tiny_services):
    from hfprune_ui.tabs.recover import make_start

    services, session, _folder = tiny_services
    services.prune(session, "entropy", 0.5, "global", 1, "half")
    _copies(session, "half", ["b", "c", "d"])
    form = ["half", "lora", 0, 2, 1e-3, "", 1.0, 1.0, 4, 2, 32, 1]  # the Recover tab's inputs
    status = list(make_start(services)(*form))[-1][0]
    assert "Recovered" in status and "'b' was dropped from memory to make room" in status
    line = status_markdown(services, session)
    assert "**Variants** 4 of 4: half, c, d, half+kd-lora" in line  # the source stayed; the count is right


def test_recover_ddp_and_pipeline_redraw_the_status_line_when_they_end(tmp_path):
    from hfprune_ui import build_demo
    from hfprune_ui.services import Services

    demo = build_demo(Services(runs_root=tmp_path / "runs"))
    fns = demo.fns
    for api_name in ("recover", "ddp", "pipeline", "pipeline_ablation", "prune", "quantize"):
        [index] = [i for i, fn in fns.items() if fn.api_name == api_name]
        after = [fn for fn in fns.values() if fn.trigger_after == index]
        assert any("status-line" in [o.elem_id for o in fn.outputs] and not fn.trigger_only_on_success
                   for fn in after), f"/{api_name} leaves the status line stale"
