"""SALE attention: the public op, its reference implementation and the CUDA backend."""

from .api import SaleOutput, available_backends, sale_attention

__all__ = ["SaleOutput", "available_backends", "sale_attention"]
