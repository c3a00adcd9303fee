"""torch.distributed on CPU (gloo, 2 ranks launched by torchrun): the collectives datm_fast uses."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torchrun import LEAVE, rank_rows, torchrun

from datm_fast.distributed import SINGLE, Distributed, RanksDisagree, from_environment, launched_by_torchrun

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, pathlib, sys, torch
    from datm_fast.distributed import RanksDisagree, from_environment

    with from_environment("cpu", timeout_s=60) as d:
        total = d.all_reduce_sum(torch.tensor([d.rank + 1.0], dtype=torch.float64))
        d.agree("the dataset", "same everywhere")
        try:
            d.agree("the config", {"lr_img": 100 if d.rank == 0 else 50})
            disagreement = None
        except RanksDisagree as exc:
            disagreement = str(exc)
        row = {
            "rank": d.rank,
            "world_size": d.world_size,
            "sum": total.item(),
            "mine": d.mine(list(range(5))),
            "gathered": d.all_gather_object(d.rank * 10),
            "broadcast": d.broadcast_object("from rank 0" if d.is_main else None),
            "disagreement": disagreement,
        }
        pathlib.Path(sys.argv[1], f"row{d.rank}.json").write_text(json.dumps(row))
    """
)


def test_two_ranks_sum_gather_broadcast_and_refuse_disagreeing_inputs(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT + LEAVE)
    done = torchrun(2, script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rank_rows(tmp_path, 2)
    assert [r["rank"] for r in rows] == [0, 1] and all(r["world_size"] == 2 for r in rows)
    assert all(r["sum"] == 3.0 for r in rows)
    assert [r["mine"] for r in rows] == [[0, 2, 4], [1, 3]]
    assert all(r["gathered"] == [0, 10] and r["broadcast"] == "from rank 0" for r in rows)
    for r in rows:  # raised on every rank, naming each rank's value
        assert r["disagreement"] == (
            "the ranks disagree on the config (rank 0: {'lr_img': 100}; rank 1: {'lr_img': 50}); "
            "every rank must be given the same"
        )


def test_without_torchrun_a_run_is_one_rank_and_collectives_are_the_identity(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun() and from_environment("cpu") is SINGLE
    assert SINGLE.mine([1, 2, 3]) == [1, 2, 3] and SINGLE.is_main and not SINGLE.active
    assert SINGLE.all_gather_object("x") == ["x"] and SINGLE.broadcast_object(5) == 5
    SINGLE.agree("anything", object())  # one rank always agrees with itself
    with pytest.raises(ValueError, match="rank 2 of world_size 2 is not a rank"):
        Distributed(rank=2, world_size=2)
    assert issubclass(RanksDisagree, RuntimeError)


def test_one_device_rule_for_every_command():
    """buffer, distill and eval place a rank alike (Distributed.device): with several ranks a CUDA rank
    runs on cuda:LOCAL_RANK, 'cuda' becomes it, another index is refused by name; one rank runs as asked.
    No CUDA is touched: torch.device objects only."""
    rank1 = Distributed(rank=1, world_size=2, local_rank=1)
    assert rank1.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert rank1.device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert rank1.device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(
        ValueError, match=r"device cuda:0: under torchrun each rank runs on cuda:LOCAL_RANK \(rank 1 of 2"
    ):
        rank1.device(torch.device("cuda", 0))
    assert SINGLE.device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # one process: as asked
    assert SINGLE.device(torch.device("cuda")) == torch.device("cuda")
