"""One loader for every checkpoint format; untrusted pickles are refused, not executed."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from voxport.errors import CheckpointError
from voxport.models.checkpoint import load_into, load_state_dict


class _Payload:
    """A pickle that would run code on load if weights_only were off."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _linear_sd() -> dict[str, torch.Tensor]:
    return torch.nn.Linear(3, 2).state_dict()


@pytest.mark.parametrize("nesting", [None, "model_state", "model", "generator"])
def test_every_known_nesting_loads(tmp_path: Path, nesting: str | None) -> None:
    sd = _linear_sd()
    path = tmp_path / "ckpt.pt"
    torch.save(sd if nesting is None else {nesting: sd, "step": 7}, path)
    loaded = load_state_dict(path)
    assert set(loaded) == {"weight", "bias"}
    assert torch.equal(loaded["weight"], sd["weight"])


def test_code_carrying_pickle_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model_state": _linear_sd(), "payload": _Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "evil.pt" in message and "weights_only" in message and "\n" not in message


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.pt")


def test_no_state_dict_inside(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    with open(path, "wb") as fh:
        pickle.dump({"step": 3}, fh)
    with pytest.raises(CheckpointError):
        load_state_dict(path)


def test_strict_load_names_first_problem() -> None:
    module = torch.nn.Linear(3, 2)
    wrong = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'weight'.*\(2, 4\).*\(2, 3\)"):
        load_into(module, wrong, source="x.pt")
    with pytest.raises(CheckpointError, match="missing key 'bias'"):
        load_into(module, {"weight": torch.zeros(2, 3)}, source="x.pt")
    with pytest.raises(CheckpointError, match="unexpected key 'extra'"):
        load_into(module, {**_linear_sd(), "extra": torch.zeros(1)}, source="x.pt")
