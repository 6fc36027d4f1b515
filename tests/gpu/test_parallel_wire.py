"""How rank 0 describes a transformer call to the other ranks (header + tensors, cached arguments)."""

from __future__ import annotations

import gc
import pickle
import weakref

import pytest
import torch

from gpu.service.engines.wire import CallSender, _decode, _tensor_specs
from gpu.vap.transformer import ContextKV, MainContext, ReferenceContext


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


def test_the_senders_cache_keeps_no_argument_alive():
    # The pipeline frees the reference stream and the context before the VAE decode; a strong
    # reference here would keep them (GBs at 720p) on rank 0's GPU through the decode's peak.
    sender = CallSender()
    reference, text = _reference(), torch.randn(2, 5, 3)
    watch = [weakref.ref(reference), weakref.ref(text)]
    sender.header({"reference": reference, "encoder_hidden_states": text})
    del reference, text
    gc.collect()
    assert [w() for w in watch] == [None, None]
    # A new object afterwards is sent in full, never taken for the dead cached one.
    header, _ = sender.header({"reference": _reference(), "encoder_hidden_states": torch.randn(2, 5, 3)})
    assert ("cached",) not in header.values()


def test_unsupported_argument_is_refused():
    with pytest.raises(TypeError, match="cannot send"):
        CallSender().header({"x": object()})


def _rebuild(header, tensors):
    header = pickle.loads(pickle.dumps(header))
    queue = [t.contiguous().clone() for t in tensors]  # what a receiver's broadcast buffers hold
    rebuilt = {name: _decode(node, queue) for name, node in header.items()}
    assert not queue
    return rebuilt


def test_broadcast_views_travel_as_one_slice_and_arrive_as_views():
    """The pipeline's CFG rows are `expand`ed views of one row; the transformer computes them once
    only when it sees stride 0, so every rank must see the same strides as rank 0."""
    row, t = torch.randn(1, 3, 1, 2, 2), torch.tensor(700)
    header, tensors = CallSender().header({"hidden_states": row.expand(2, -1, -1, -1, -1),
                                           "timestep": t.expand(2), "plain": torch.randn(2, 3)})  # fmt: skip
    assert [tuple(x.shape) for x in tensors] == [(1, 3, 1, 2, 2), (1,), (2, 3)]  # half the bytes
    got = _rebuild(header, tensors)
    assert got["hidden_states"].shape == (2, 3, 1, 2, 2) and got["hidden_states"].stride(0) == 0
    assert torch.equal(got["hidden_states"][1], row[0])
    assert got["timestep"].stride(0) == 0 and got["timestep"].tolist() == [700, 700]
    assert got["plain"].stride(0) == 3


def test_contexts_travel_but_the_senders_cached_token_slice_does_not():
    reference = _reference()
    reference.kv = {0: ContextKV(*(torch.randn(2, 5, 1, 4) for _ in range(4)))}
    # Rank 0 fills this with ITS slice of the reference tokens; another rank must compute its own.
    reference.first_expert_qkv = (torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    context = MainContext(dtype=torch.bfloat16, kv=[ContextKV(*(torch.randn(2, 5, 1, 4) for _ in range(4)))])
    header, tensors = CallSender().header({"reference": reference, "context": context})
    assert len(tensors) == 5 + 4 + 4  # no first_expert_qkv among them
    got = _rebuild(header, tensors)
    assert got["reference"].first_expert_qkv is None
    assert torch.equal(got["reference"].kv[0].value_img, reference.kv[0].value_img)
    assert got["context"].dtype is torch.bfloat16 and torch.equal(got["context"].kv[0].key, context.kv[0].key)
