"""Guard engines, one module each, imported lazily by name (see `rsafe_proxy.guard.engine.ENGINES`)."""
