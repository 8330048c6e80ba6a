"""SALE attention: the public op, its reference implementation and the CUDA backend.

The op's names load on first use (PEP 562): importing ``constants`` alone does not load torch (the CLI's start)."""

__all__ = ["SaleOutput", "available_backends", "sale_attention"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
