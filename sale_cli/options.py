"""One options object for the SALE op, shared by the CLI, the runner, calibration and thresholds files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from sale_cli.kernels import constants
from sale_cli.kernels.api import BACKENDS, ESTIMATES, QUANT_GROUPS


@dataclass(frozen=True)
class SaleOptions:
    """Options of :func:`sale_cli.kernels.sale_attention` other than the thresholds."""

    block_q: int = constants.BLOCK_Q
    block_k: int = constants.BLOCK_K
    sink_tokens: int | None = constants.SINK_TOKENS
    local_window: int = constants.LOCAL_WINDOW
    estimate: str = constants.ESTIMATE
    quant_group: str = constants.QUANT_GROUP
    dense_below: int = constants.DENSE_BELOW
    backend: str = constants.BACKEND

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {self.estimate!r}")
        if self.quant_group not in QUANT_GROUPS:
            raise ValueError(f"quant_group must be one of {QUANT_GROUPS}, got {self.quant_group!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def op_kwargs(self) -> dict:
        """Keyword arguments for sale_attention."""
        return asdict(self)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], backend: str = "auto") -> SaleOptions:
        """The options recorded in a thresholds file."""
        sink = meta.get("sink_tokens", "None")
        return cls(block_q=int(meta["block_q"]), block_k=int(meta["block_k"]),
                   sink_tokens=None if sink == "None" else int(sink), local_window=int(meta["local_window"]),
                   estimate=meta["estimate"], quant_group=meta["quant_group"], backend=backend)

    def metadata(self) -> dict[str, str]:
        """The options that change which blocks are selected, as strings for a thresholds file.

        ``backend`` and ``dense_below`` do not change the function on long inputs, so they are not recorded.
        """
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if f.name not in ("backend", "dense_below")}
