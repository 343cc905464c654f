"""L3: GPU + DIMM-PIM long-context LLM inference (simulator, device model, engine)."""

__version__ = "0.1.0"
