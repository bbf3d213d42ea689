"""rgemma: RecurrentGemma (Griffin) on a laptop CPU, exact to the reference.

    from rgemma_cli import load
    model, tokenizer = load("google/recurrentgemma-2b-it")   # or a local directory, or "demo"
    state = model.initial_state()
    logits, state = model.forward(tokenizer.raw_prompt("Hello"), state)

    session = Session(model, tokenizer, SamplerSettings(temperature=0.7, seed=1), mode="chat")
    for piece in session.send("Hi!", max_tokens=64):    # the reply goes into session.transcript
        print(piece, end="", flush=True)
"""

from __future__ import annotations

__all__ = ["load", "RgemmaError", "Session", "SamplerSettings"]
__version__ = "0.1.0"

# Imported on first use (PEP 562), so that importing the package stays light: the `rgemma`
# command (`entry.py`) can take over Ctrl-C before NumPy, Numba and the model code load.
_LAZY = {"RgemmaError": "errors", "Session": "generation", "SamplerSettings": "sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def load(path_or_repo_id: str):
    """Load a model and its tokenizer from a local directory, "demo", or a Hugging Face repo id.

    Returns (model, tokenizer); tokenizer is None when the directory has no tokenizer.model.
    `model.card` (a `modelcard.ModelCard`) says whether the chat template applies, and why,
    and which ids end generation.
    """
    from .checkpoint import load_weights, resolve
    from .model import Griffin
    from .modelcard import read_card

    directory = resolve(str(path_or_repo_id))
    config, weights, fingerprint = load_weights(directory)
    model = Griffin(config, weights, fingerprint)
    model.card = read_card(directory, str(path_or_repo_id))
    tokenizer = None
    if (directory / "tokenizer.model").exists():
        from .tokenizer import Tokenizer
        tokenizer = Tokenizer(directory / "tokenizer.model")
    return model, tokenizer
