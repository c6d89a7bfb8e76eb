"""Shared fixtures: tiny random models of every supported family, and the embedded real model.

Tiny models use the real SmolLM2 tokenizer's vocabulary size so they can be saved and reloaded
with a tokenizer like any real checkpoint; everything else about them is small and random.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest worker per core: each keeps to one thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python -m core <args> --quiet``: exit status, stdout and stderr of the command.

    By default ``core.cli.main`` runs in this process with stdout / stderr captured and the
    environment restored afterwards: the same argument parsing, handlers and error handling as the
    console command, without the ~5 s of importing torch per call (the suite makes ~40 CLI calls).
    ``fresh=True`` runs a real ``python -m core`` in a fresh offline process (the entry point
    itself, start-up warnings): tests/test_quiet.py and tests/test_pipeline.py use it.
    """
    argv = [*args, "--quiet"]
    if fresh:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "core", *argv], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)
    from core.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse errors and --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["python", "-m", "core", *argv], code, out.getvalue(), err.getvalue())


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
VOCAB = 49152


def tiny_config(arch: str, intermediate_size: int = 64, layers: int = 2):
    """A small config of the given family (hidden 32, 4 heads / 2 KV heads)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=8,
                  tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**common, use_sliding_window=False)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**common, query_pre_attn_scalar=8, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"][:layers] + ["full_attention"] * max(0, layers - 2))
    raise ValueError(arch)


def make_tiny(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs)).to(torch.float32).eval()
    with torch.no_grad():  # random init is near-zero for some families; widen it so tests see real signal
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def real():
    """The embedded default model (SmolLM2-135M), converted once into the cache and loaded once."""
    from core.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def real_tokenizer():
    """The embedded model's tokenizer alone (no weights): tiny models are saved and run with it, so the
    fast lane (-m "not real") never loads SmolLM2-135M."""
    from core.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_loaded(real_tokenizer):
    """Factory: a LoadedModel around a tiny random model of ``arch`` with the real tokenizer."""
    from core.models.loading import LoadedModel

    def build(arch: str = "llama", **kwargs) -> LoadedModel:
        return LoadedModel(model=make_tiny(arch, **kwargs), tokenizer=real_tokenizer, spec=f"tiny-{arch}", path="")

    return build


@pytest.fixture()
def tiny_services(tmp_path, real_tokenizer):
    """(services, session 'local', model folder): a tiny llama (MLP width 64) saved with the real tokenizer
    to tmp_path/'tiny', a Services with its run store at tmp_path/'runs', and the model's entropy scores
    computed on 2 wiki windows of 16 tokens."""
    from hfprune_ui.services import Services

    folder = tmp_path / "tiny"
    make_tiny("llama", intermediate_size=64).save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    services = Services(runs_root=tmp_path / "runs")
    session = services.sessions.get("local")
    services.score(session, str(folder), services.data_spec("wiki", None, 2, 16, 0), "entropy")
    return services, session, folder


@pytest.fixture(scope="session")
def launch_dashboard(real):
    """Generator factory: launch the dashboard in this process on a free local port with the run
    store ``runs_root``; yields (url, services) and closes the server afterwards."""
    def launch(runs_root):
        from hfprune_ui import build_demo, launch_options, queue
        from hfprune_ui.services import Services

        services = Services(runs_root=runs_root)
        services.models.get("smollm2-135m")  # already converted by the ``real`` fixture; this only loads
        demo = queue(build_demo(services))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_options())
        try:
            yield f"http://127.0.0.1:{port}/", services
        finally:
            demo.close()

    return launch


def pytest_collection_modifyitems(config, items):
    """A test that uses the embedded model (the ``real`` fixture, or one built on it such as
    ``launch_dashboard``) is marked ``real`` whatever its file says, so ``-m "not real"`` never loads it."""
    for item in items:
        if "real" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)


@pytest.fixture(autouse=True)
def _embedded_model_only_when_marked(request, monkeypatch):
    """Outside tests marked ``real``, converting or loading the embedded model fails at once with a sentence
    saying so, instead of silently making the fast lane slow."""
    if request.node.get_closest_marker("real"):
        return

    import core.models.loading as loading

    def refuse(alias: str):
        raise AssertionError(f"this test loads the embedded model '{alias}'; mark it @pytest.mark.real "
                             f"or use a tiny model")

    monkeypatch.setattr(loading, "ensure_embedded", refuse)
