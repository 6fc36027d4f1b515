"""How rank 0 describes a transformer call to the other ranks (header + tensors, cached arguments)."""

from __future__ import annotations

import pickle

import pytest
import torch

from gpu.parallel.wire import CallSender, _decode, _tensor_specs
from gpu.vap.transformer import ReferenceContext


def _reference() -> ReferenceContext:
    return ReferenceContext(
        tokens=torch.randn(1, 6, 4),
        timestep_proj=torch.randn(1, 6, 4),
        encoder_hidden_states=torch.randn(2, 7, 4),
        rotary=(torch.randn(1, 6, 1, 2), torch.randn(1, 6, 1, 2)),
    )


def test_header_rebuilds_the_call_and_caches_unchanged_arguments():
    sender = CallSender()
    reference, text = _reference(), torch.randn(2, 5, 3)
    first = {"hidden_states": torch.randn(2, 3, 1, 2, 2), "encoder_hidden_states": text,
             "reference": reference, "return_dict": False}  # fmt: skip
    header, tensors = sender.header(first)
    header = pickle.loads(pickle.dumps(header))  # it travels over a pipe
    assert len(tensors) == 1 + 1 + 5  # the reference's four fields hold five tensors
    assert [t.shape for t in tensors] == [
        torch.Size(s) for node in header.values() for s, _ in _tensor_specs(node)
    ]

    queue = list(tensors)
    rebuilt = {name: _decode(node, queue) for name, node in header.items()}
    assert not queue
    assert rebuilt["return_dict"] is False
    assert isinstance(rebuilt["reference"], ReferenceContext)
    assert isinstance(rebuilt["reference"].rotary, tuple)
    assert torch.equal(rebuilt["reference"].rotary[1], reference.rotary[1])
    assert torch.equal(rebuilt["encoder_hidden_states"], text)

    # Next step: new latents, same context and reference objects -> only the latents travel.
    header2, tensors2 = sender.header({**first, "hidden_states": torch.randn(2, 3, 1, 2, 2)})
    assert header2["encoder_hidden_states"] == ("cached",) and header2["reference"] == ("cached",)
    assert header2["hidden_states"][0] == "tensor" and len(tensors2) == 1
    # An equal but new object is sent again (identity, not equality, decides).
    header3, _ = sender.header({**first, "encoder_hidden_states": text.clone()})
    assert header3["encoder_hidden_states"][0] == "tensor"

    sender.reset()
    header4, _ = sender.header(first)
    assert ("cached",) not in header4.values()


def test_unsupported_argument_is_refused():
    with pytest.raises(TypeError, match="cannot send"):
        CallSender().header({"x": object()})
