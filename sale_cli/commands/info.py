"""The `sale info` command: versions, GPUs, attention backends and the demo model."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def info():
    """Show versions, GPUs, available attention backends and whether the demo model is present."""
    import platform

    import torch
    import transformers

    from sale_cli import __version__, demo_model
    from sale_cli.kernels import available_backends

    table = Table(title="sale environment", show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")  # long paths and reasons wrap instead of being cut at the terminal width
    table.add_row("sale", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("CUDA (torch build)", str(torch.version.cuda))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            table.add_row(f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
            free, total = torch.cuda.mem_get_info(i)
            table.add_row(f"GPU {i} memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    else:
        table.add_row("GPUs", "none visible")
    backends = available_backends()
    for name, status in backends.items():
        table.add_row(f"SALE backend: {name}", status)
    if backends.get("cuda") == "available":
        from sale_cli.kernels import cuda_backend

        table.add_row("SALE compute pass (auto)", cuda_backend.default_compute())
    from sale_cli.runner import probe_dense_backend

    table.add_row("dense attention", probe_dense_backend())
    path = demo_model.cached_path()
    table.add_row(f"demo model ({demo_model.ALIAS})", str(path) if path else "not fetched yet (fetched on first use)")
    Console().print(table)
