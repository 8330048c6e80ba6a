"""The op's constants have one owner per language: kernels/constants.py and kernels/csrc/sale_config.cuh must agree,
and the CUDA sources must take the header's values rather than literals of their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sale_cli.kernels import constants
from sale_cli.options import SaleOptions

CSRC = Path(constants.__file__).parent / "csrc"


def _header_constants(header: Path = CSRC / "sale_config.cuh") -> dict[str, int]:
    text = header.read_text()
    found = dict(re.findall(r"^\s*constexpr\s+int\s+(k\w+)\s*=\s*(\d+)\s*;", text, flags=re.M))
    return {name: int(value) for name, value in found.items()}


def test_header_equals_python_constants():
    header = _header_constants()
    assert header["kBlockQ"] == constants.CUDA_BLOCK_Q == 64
    assert header["kBlockK"] == constants.CUDA_BLOCK_K == 32
    assert header["kRowPad"] == constants.CUDA_ROW_PAD
    assert header["kMaxGroup"] == constants.CUDA_MAX_GROUP
    assert (header["kHeadDimSmall"], header["kHeadDimLarge"]) == constants.CUDA_HEAD_DIMS
    assert header["kBitmapWordBits"] == constants.BITMAP_WORD_BITS


def test_the_parser_sees_a_changed_header(tmp_path):
    """The check above can fail: a header with another block size parses to another value."""
    text = (CSRC / "sale_config.cuh").read_text().replace("kBlockK = 32;", "kBlockK = 64;")
    (tmp_path / "sale_config.cuh").write_text(text)
    assert _header_constants(tmp_path / "sale_config.cuh")["kBlockK"] == 64 != constants.CUDA_BLOCK_K


@pytest.mark.parametrize("name", ["kBlockQ", "kBlockK", "kColsumRows", "kRowPad", "kMaxGroup"])
def test_constants_are_defined_once(name):
    """No other source defines its own copy of a header constant."""
    for path in sorted(CSRC.glob("*.c*")):
        if path.name == "sale_config.cuh":
            continue
        assert not re.search(rf"constexpr\s+int\s+{name}\b", path.read_text()), f"{path.name} redefines {name}"


def test_defaults_come_from_constants():
    opts = SaleOptions()
    assert (opts.block_q, opts.block_k, opts.sink_tokens, opts.local_window, opts.dense_below) == (
        constants.BLOCK_Q, constants.BLOCK_K, constants.SINK_TOKENS, constants.LOCAL_WINDOW, constants.DENSE_BELOW)
    assert (opts.estimate, opts.quant_group, opts.backend) == (constants.ESTIMATE, constants.QUANT_GROUP,
                                                               constants.BACKEND)
