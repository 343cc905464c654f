"""User-facing errors: each carries one line that names what was wrong and what was expected."""


class L3Error(Exception):
    """Base for every error the CLI reports as one clear line (no traceback)."""


class SpecError(L3Error):
    """An invalid or impossible specification (model, hardware, system)."""


class WorkloadError(L3Error):
    """A malformed workload file or an unknown workload name."""


class EngineError(L3Error):
    """The real engine cannot run as asked: unknown architecture, missing or corrupt weights, a prompt beyond the
    KV capacity, an unknown backend."""
