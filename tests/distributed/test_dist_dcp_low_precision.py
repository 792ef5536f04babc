"""Distributed checkpoints (DCP) of low-precision optimizer state under FSDP2, across world
sizes and formats.

``state_dict`` presents an 8-bit moment of a DTensor parameter as a float32 DTensor of its
decoded values (block scales belong to one layout of the shards), which DCP reshards; loading
encodes it again into the receiving shards' blocks. Three process groups run in turn:

1. one rank trains three steps in each format and saves;
2. two ranks train three steps and save, continue uninterrupted, and resume fresh models
   from their own checkpoint (bit-identical: same codes, same scales, same parameters),
   from the one-rank checkpoint, and into another state_dtype;
3. one rank resumes from the two-rank checkpoint; an unsharded model's 8-bit state
   (codes and whole-tensor scales) loads only into the same model and format, and any
   other receiver refuses it with the reason.

Every run is fed the same global gradients (dist_helpers.fed_gradients); a resumed run that
changed world size or format is checked against an unsharded run to the format's rounding.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import (
    fed_gradients,
    feed,
    make_float32_model,
    require_fully_shard,
    shard_fsdp2,
    spawn,
)
from torch import Tensor, nn

from dynabound import AdaBound
from dynabound import state_formats as formats

pytestmark = pytest.mark.distributed

STEPS = 3  # before and after the checkpoint
HYPER: dict[str, Any] = dict(lr=1e-2, final_lr=0.3, gamma=0.2, weight_decay=1e-3, amsbound=True)
FORMATS: dict[str, Any] = {"bf16": torch.bfloat16, "8bit": formats.EIGHT_BIT, "fp32": None}
SAVED = ("bf16", "8bit")
# Loading into another format: (saved, loaded into).
CONVERSIONS = [("8bit", "bf16"), ("8bit", "fp32"), ("bf16", "8bit"), ("fp32", "8bit")]


def _build(fmt: str, seed: int = 0) -> tuple[nn.Module, AdaBound]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    model = make_float32_model(seed)
    shard_fsdp2(model, mesh)
    return model, AdaBound(model.parameters(), **HYPER, state_dtype=FORMATS[fmt], foreach=False)


def _fed() -> list[dict[str, Tensor]]:
    return fed_gradients(make_float32_model(), 2 * STEPS)


def _local_state(model: nn.Module, optimizer: AdaBound) -> dict[str, dict[str, Tensor]]:
    """The optimizer's own state on this rank (codes and scales), by parameter name."""
    out = {}
    for name, p in model.named_parameters():
        entry = optimizer.state[p]
        out[name] = {
            key: (v.to_local() if hasattr(v, "to_local") else v).clone() for key, v in entry.items()
        }
    return out


def _save(model: nn.Module, optimizer: AdaBound, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    model_sd, optim_sd = sd.get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _resume(fmt: str, path: Path) -> tuple[nn.Module, AdaBound]:
    """A fresh model (other initial weights) and optimizer in ``fmt``, loaded from ``path``."""
    model, optimizer = _build(fmt, seed=99)
    _load(model, optimizer, path)
    return model, optimizer


def _load(model: nn.Module, optimizer: AdaBound, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    loaded = {"model": sd.get_model_state_dict(model)}
    dcp.load(loaded, checkpoint_id=path)
    sd.set_model_state_dict(model, loaded["model"])
    loaded = {"optim": sd.get_optimizer_state_dict(model, optimizer)}
    dcp.load(loaded, checkpoint_id=path)
    sd.set_optimizer_state_dict(model, optimizer, loaded["optim"])


def _full(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _guarded(results: dict, key: Any, fn) -> None:
    try:
        results[key] = fn()
    except Exception:  # reported by this case's test, not fatal to the others
        results[key] = traceback.format_exc()


def _one_rank_saves(rank: int, out_dir: Path) -> None:
    for fmt in SAVED:
        model, optimizer = _build(fmt)
        feed(model, optimizer, _fed()[:STEPS])
        _save(model, optimizer, out_dir / f"w1-{fmt}")


def _two_ranks(rank: int, out_dir: Path) -> None:
    fed = _fed()
    results: dict[Any, Any] = {}
    for fmt in FORMATS:

        def same_world(fmt=fmt) -> dict[str, Any]:
            model, optimizer = _build(fmt)
            feed(model, optimizer, fed[:STEPS])
            saved_state = _local_state(model, optimizer)
            _save(model, optimizer, out_dir / f"w2-{fmt}")
            model, optimizer = _resume(fmt, out_dir / f"w2-{fmt}")
            loaded_state = _local_state(model, optimizer)
            feed(model, optimizer, fed[STEPS:])
            return {"saved": saved_state, "loaded": loaded_state, "resumed": _full(model)}

        _guarded(results, ("same", fmt), same_world)
    for fmt in FORMATS:

        def uninterrupted(fmt=fmt) -> dict[str, Tensor]:
            model, optimizer = _build(fmt)
            feed(model, optimizer, fed)
            return _full(model)

        _guarded(results, ("uninterrupted", fmt), uninterrupted)
    for fmt in SAVED:

        def from_one_rank(fmt=fmt) -> dict[str, Tensor]:
            model, optimizer = _resume(fmt, out_dir / f"w1-{fmt}")
            feed(model, optimizer, fed[STEPS:])
            return _full(model)

        _guarded(results, ("1to2", fmt), from_one_rank)
    for saved, into in CONVERSIONS:

        def converted(saved=saved, into=into) -> dict[str, Any]:
            model, optimizer = _resume(into, out_dir / f"w2-{saved}")
            stored = optimizer.state[next(iter(model.parameters()))]["exp_avg"].dtype
            feed(model, optimizer, fed[STEPS:])
            return {"params": _full(model), "stored": stored}

        _guarded(results, ("convert", saved, into), converted)
    torch.save(results, out_dir / f"w2-rank{rank}.pt")


def _one_rank_resumes(rank: int, out_dir: Path) -> None:
    results: dict[Any, Any] = {}
    for fmt in SAVED:

        def from_two_ranks(fmt=fmt) -> dict[str, Tensor]:
            model, optimizer = _resume(fmt, out_dir / f"w2-{fmt}")
            feed(model, optimizer, _fed()[STEPS:])
            return _full(model)

        _guarded(results, ("2to1", fmt), from_two_ranks)
    _guarded(results, "plain", lambda: _plain_codes_into_other_receivers(out_dir / "plain-8bit"))
    torch.save(results, out_dir / "w1-rank0.pt")


def _plain_codes_into_other_receivers(path: Path) -> dict[str, str | None]:
    """An unsharded model's 8-bit state (codes and whole-tensor scales) saved with DCP, then
    loaded into receivers that cannot take it: the errors, by receiver."""

    def plain(fmt: str, seed: int = 0) -> tuple[nn.Module, AdaBound]:
        model = make_float32_model(seed)
        kwargs = dict(state_dtype=FORMATS[fmt], foreach=False)
        return model, AdaBound(model.parameters(), **HYPER, **kwargs)

    model, optimizer = plain("8bit")
    feed(model, optimizer, _fed()[:STEPS])
    _save(model, optimizer, path)
    receivers = {
        "plain fp32": lambda: plain("fp32", seed=99),
        "plain bf16": lambda: plain("bf16", seed=99),
        "sharded 8bit": lambda: _build("8bit", seed=99),
    }
    errors: dict[str, str | None] = {}
    for name, build in receivers.items():
        try:
            _load(*build(), path)
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    model, optimizer = plain("8bit", seed=99)
    _load(model, optimizer, path)  # the same unsharded model and format: loads
    return errors


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_fully_shard()
    out_dir = tmp_path_factory.mktemp("dcp_low_precision")
    spawn(_one_rank_saves, out_dir, world_size=1)
    spawn(_two_ranks, out_dir, world_size=2)
    spawn(_one_rank_resumes, out_dir, world_size=1)
    two = [torch.load(out_dir / f"w2-rank{rank}.pt") for rank in range(2)]
    return {"two": two, "one": torch.load(out_dir / "w1-rank0.pt"), "dir": out_dir}


def _get(results: dict, key: Any) -> Any:
    if isinstance(results[key], str):
        pytest.fail(f"{key} failed:\n{results[key]}")
    return results[key]


def _unsharded(fmt: str) -> dict[str, Tensor]:
    model = make_float32_model()
    optimizer = AdaBound(model.parameters(), **HYPER, state_dtype=FORMATS[fmt], foreach=False)
    feed(model, optimizer, _fed())
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_within_rounding(got: dict[str, Tensor], fmt: str) -> None:
    """``got`` equals an unsharded run in ``fmt`` to the format's rounding: by a small part
    of how far the parameters moved (as in test_dist_fsdp2_low_precision.py)."""
    want, exact = _unsharded(fmt), _unsharded("fp32")
    initial = {n: p.detach() for n, p in make_float32_model().named_parameters()}
    part = {"8bit": 0.25, "bf16": 0.02, "fp32": 1e-5}[fmt]
    for key, value in want.items():
        moved = (exact[key] - initial[key]).abs().max().item()
        assert moved > 1e-2, key
        assert (got[key] - value).abs().max().item() <= part * moved, key


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_world_size_resume_is_bit_identical(runs, fmt):
    for rank, results in enumerate(runs["two"]):
        outcome = _get(results, ("same", fmt))
        for name, saved in outcome["saved"].items():
            loaded = outcome["loaded"][name]
            assert saved.keys() == loaded.keys(), name
            for key, value in saved.items():
                assert loaded[key].dtype == value.dtype, f"rank {rank}: {name}.{key}"
                assert torch.equal(loaded[key], value), f"rank {rank}: {name}.{key}"
        uninterrupted = _get(results, ("uninterrupted", fmt))
        for name, value in uninterrupted.items():
            assert torch.equal(outcome["resumed"][name], value), f"rank {rank}: {name}"


@pytest.mark.parametrize("fmt", SAVED)
def test_checkpoint_holds_no_block_scales(runs, fmt):
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(runs["dir"] / f"w2-{fmt}").read_metadata().state_dict_metadata
    moments = {k: v for k, v in metadata.items() if k.startswith("optim.") and "exp_avg" in k}
    assert moments and not [k for k in moments if k.endswith("_scale")]
    want = torch.float32 if fmt == "8bit" else torch.bfloat16
    assert {v.properties.dtype for v in moments.values()} == {want}


@pytest.mark.parametrize("fmt", SAVED)
def test_two_ranks_to_one(runs, fmt):
    _assert_within_rounding(_get(runs["one"], ("2to1", fmt)), fmt)


@pytest.mark.parametrize("fmt", SAVED)
def test_one_rank_to_two(runs, fmt):
    for results in runs["two"]:
        _assert_within_rounding(_get(results, ("1to2", fmt)), fmt)


@pytest.mark.parametrize(("saved", "into"), CONVERSIONS)
def test_loading_into_another_state_dtype(runs, saved, into):
    stored = {"8bit": torch.int8, "bf16": torch.bfloat16, "fp32": torch.float32}[into]
    for results in runs["two"]:
        outcome = _get(results, ("convert", saved, into))
        assert outcome["stored"] == stored
        # The coarser of the two formats sets the rounding.
        _assert_within_rounding(outcome["params"], "8bit" if "8bit" in (saved, into) else into)


def test_unsharded_8bit_codes_into_another_receiver_are_refused(runs):
    errors = _get(runs["one"], "plain")
    for receiver, error in errors.items():
        assert error is not None and "arrived without its block scales" in error, receiver
